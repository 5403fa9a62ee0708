"""Messages with a real encoded form, wire codecs, roles and engines that carry messages."""

from cotune.runtime.codecs import (
    Codec,
    available_codecs,
    codec_families,
    get_codec,
    register_codec,
    register_codec_family,
)
from cotune.runtime.engine import Engine, Role, Transfer
from cotune.runtime.local import LocalEngine
from cotune.runtime.message_decode import decode_message
from cotune.runtime.messages import Message, encode_message
from cotune.runtime.validate import check_activation

__all__ = [
    "Codec",
    "Engine",
    "LocalEngine",
    "Message",
    "Role",
    "Transfer",
    "available_codecs",
    "check_activation",
    "codec_families",
    "decode_message",
    "encode_message",
    "get_codec",
    "register_codec",
    "register_codec_family",
]
