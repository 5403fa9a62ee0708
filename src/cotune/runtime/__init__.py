"""Messages with a real encoded form, wire codecs, roles and engines that carry messages."""

from cotune.runtime.codecs import Codec, available_codecs, get_codec, register_codec
from cotune.runtime.engine import Engine, Role, Transfer
from cotune.runtime.local import LocalEngine
from cotune.runtime.messages import Message, decode_message, encode_message

__all__ = [
    "Codec",
    "Engine",
    "LocalEngine",
    "Message",
    "Role",
    "Transfer",
    "available_codecs",
    "decode_message",
    "encode_message",
    "get_codec",
    "register_codec",
]
