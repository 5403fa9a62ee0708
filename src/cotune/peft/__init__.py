"""Parameter-efficient adapters: method registry, injection, and PEFT-format save/load."""

from cotune.peft.base import (
    AdapterLayer,
    LayerSpec,
    MethodSpec,
    available_methods,
    get_method,
    register_method,
)
from cotune.peft.bora import BoraLayer, BoraOptions
from cotune.peft.d2lora import D2loraLayer, D2loraOptions
from cotune.peft.dora import DoraLayer, DoraOptions
from cotune.peft.gelora import GeloraLayer, GeloraOptions
from cotune.peft.ggm import GgmLayer, GgmOptions
from cotune.peft.inject import AdapterSet, inject_adapters, regularization_over
from cotune.peft.kasa import KasaLayer, KasaOptions
from cotune.peft.lora import LoraLayer, LoraOptions, PlainLoraOptions
from cotune.peft.modula import ModulaLayer, ModulaOptions
from cotune.peft.mosld import MosldLayer, MosldOptions
from cotune.peft.peft_format import load_adapter, save_adapter
from cotune.peft.pissa import OloraLayer, PissaLayer, PissaOptions

# The method registry: one line per method.
register_method("lora", LoraLayer, PlainLoraOptions)
register_method("dora", DoraLayer, DoraOptions)
register_method("bora", BoraLayer, BoraOptions)
register_method("kasa", KasaLayer, KasaOptions)
register_method("pissa", PissaLayer, PissaOptions)
register_method("olora", OloraLayer)
register_method("gelora", GeloraLayer, GeloraOptions)
register_method("d2lora", D2loraLayer, D2loraOptions)
register_method("mosld", MosldLayer, MosldOptions)
register_method("modula", ModulaLayer, ModulaOptions)
register_method("ggm", GgmLayer, GgmOptions)

__all__ = [
    "AdapterLayer",
    "AdapterSet",
    "BoraLayer",
    "BoraOptions",
    "D2loraLayer",
    "D2loraOptions",
    "DoraLayer",
    "DoraOptions",
    "GeloraLayer",
    "GeloraOptions",
    "GgmLayer",
    "GgmOptions",
    "KasaLayer",
    "KasaOptions",
    "LayerSpec",
    "LoraLayer",
    "LoraOptions",
    "MethodSpec",
    "ModulaLayer",
    "ModulaOptions",
    "MosldLayer",
    "MosldOptions",
    "OloraLayer",
    "PissaLayer",
    "PissaOptions",
    "available_methods",
    "get_method",
    "inject_adapters",
    "load_adapter",
    "register_method",
    "regularization_over",
    "save_adapter",
]
