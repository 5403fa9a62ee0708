"""Secure aggregation (SecAgg, Bonawitz et al., CCS 2017; SecAgg+'s sparse neighbour graph, Bell
et al., CCS 2020): the server learns the sum of the devices' updates and nothing else.

Per round, each device u:

1. ``advertise``: makes two X25519 key pairs (one to encrypt shares, one to agree masks) and
   sends their public halves.
2. ``share``: picks a self-mask seed b_u and splits b_u and its mask key's private half into
   Shamir shares (threshold t), one per neighbour, each encrypted for that neighbour with
   AES-GCM under a key agreed by X25519 + HKDF; the server only routes them.
3. ``masked``: quantizes its update to integers mod 2³² and adds PRG(b_u) and, per neighbour v,
   ±PRG(s_uv) (s_uv agreed between u and v: the pair's masks cancel in the sum).
4. ``unmask``: once the server says who dropped and who survived, reveals its shares of the
   dropped devices' mask keys and of the survivors' self-mask seeds — never both for one device.

The server reconstructs what it needs with ``SecAggServer`` and removes the masks. PRGs are
AES-CTR keystreams; key agreement, HKDF and AES-GCM come from ``cryptography``, Shamir sharing
from PyCryptodome (16-byte secrets: a 32-byte secret is shared as two halves).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from cotune.errors import ConfigError, ProtocolError

FIELD_BITS = 32
FIELD = 1 << FIELD_BITS


def _crypto():
    try:
        from Crypto.Protocol.SecretSharing import Shamir
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import (
            X25519PrivateKey,
            X25519PublicKey,
        )
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as e:
        raise ConfigError(
            f"secure aggregation needs cryptography and pycryptodome: pip install 'cotune[secagg]' ({e})"
        ) from None
    return {"Shamir": Shamir, "hashes": hashes, "serialization": serialization,
            "X25519PrivateKey": X25519PrivateKey, "X25519PublicKey": X25519PublicKey,
            "Cipher": Cipher, "algorithms": algorithms, "modes": modes, "AESGCM": AESGCM,
            "HKDF": HKDF}  # fmt: skip


# ------------------------------------------------------------------ primitives


def _public_bytes(key) -> bytes:
    c = _crypto()
    raw = c["serialization"].Encoding.Raw
    return key.public_key().public_bytes(raw, c["serialization"].PublicFormat.Raw)


def _private_bytes(key) -> bytes:
    c = _crypto()
    s = c["serialization"]
    return key.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())


def agree(private_raw: bytes, public_raw: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends of an X25519 exchange derive (HKDF-SHA256 over the secret)."""
    c = _crypto()
    sk = c["X25519PrivateKey"].from_private_bytes(private_raw)
    shared = sk.exchange(c["X25519PublicKey"].from_public_bytes(public_raw))
    return c["HKDF"](algorithm=c["hashes"].SHA256(), length=32, salt=None, info=info).derive(shared)


def prg(seed: bytes, n: int) -> torch.Tensor:
    """``n`` uniform integers in [0, 2³²) from a 32-byte seed: an AES-256-CTR keystream."""
    c = _crypto()
    enc = c["Cipher"](c["algorithms"].AES(seed), c["modes"].CTR(b"\0" * 16)).encryptor()
    raw = enc.update(b"\0" * (4 * n))
    return torch.frombuffer(bytearray(raw), dtype=torch.int32).to(torch.int64) % FIELD


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` Shamir shares (any ``threshold`` rebuild it) of a 32-byte secret; share i is
    for index i+1 and carries that index."""
    if len(secret) != 32:
        raise ValueError("split_secret: a 32-byte secret")
    sh = _crypto()["Shamir"]
    lo, hi = sh.split(threshold, count, secret[:16]), sh.split(threshold, count, secret[16:])
    return [bytes([i]) + a + b for (i, a), (_, b) in zip(lo, hi)]


def combine_secret(shares: list[bytes]) -> bytes:
    sh = _crypto()["Shamir"]
    lo = sh.combine([(s[0], s[1:17]) for s in shares])
    hi = sh.combine([(s[0], s[17:33]) for s in shares])
    return lo + hi


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + _crypto()["AESGCM"](key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return _crypto()["AESGCM"](key).decrypt(blob[:12], blob[12:], aad)
    except Exception as e:  # InvalidTag: tampered, misrouted or not for us
        raise ProtocolError(
            f"secure aggregation: a share failed to decrypt ({type(e).__name__})"
        ) from None


def neighbours(members: list[str], degree: int | None, seed: bytes) -> dict[str, list[str]]:
    """Who masks with whom: everyone (SecAgg), or ``degree`` neighbours each on a ring in a
    seeded random order (SecAgg+'s sparse graph; ``degree`` even, below the member count)."""
    if degree is None or degree >= len(members) - 1:
        return {u: [v for v in members if v != u] for u in members}
    order = sorted(members, key=lambda m: hashlib.sha256(seed + m.encode()).digest())
    n, half = len(order), max(1, degree // 2)
    out = {u: [] for u in members}
    for i, u in enumerate(order):
        for j in range(1, half + 1):
            for v in (order[(i + j) % n], order[(i - j) % n]):
                if v != u and v not in out[u]:
                    out[u].append(v)
    return out


# ------------------------------------------------------------------ quantization


@dataclass(frozen=True)
class Quantizer:
    """Fixed point in Z_{2³²}: values clipped to [−range, range], ``bits`` bits each, times an
    integer weight (example count); the sum must stay below 2³¹ in magnitude."""

    range: float
    bits: int = 16

    @property
    def scale(self) -> float:
        return ((1 << (self.bits - 1)) - 1) / self.range

    def encode(self, values: torch.Tensor, weight: int) -> torch.Tensor:
        q = torch.round(values.float().clamp(-self.range, self.range) * self.scale).to(torch.int64)
        return torch.cat([q * int(weight), torch.tensor([int(weight)])]) % FIELD

    def decode(self, total: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(weighted sum of the values, sum of the weights) from the field sum."""
        signed = torch.where(total >= FIELD // 2, total - FIELD, total)
        return signed[:-1].double() / self.scale, int(signed[-1])


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().float().reshape(-1).cpu() for k in sorted(tensors)])


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = flat[at : at + n].reshape(like[k].shape).to(like[k].dtype).to(like[k].device)
        at += n
    return out


# ------------------------------------------------------------------ the two ends


@dataclass
class SecAggClient:
    """One device's side for one round."""

    me: str
    round: int
    _c_sk: bytes = b""
    _s_sk: bytes = b""
    _b: bytes = b""
    _nbrs: list[str] = field(default_factory=list)
    _keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    _held: dict[str, bytes] = field(default_factory=dict)  # u -> decrypted share payload

    def advertise(self) -> dict[str, str]:
        c = _crypto()
        c_key, s_key = c["X25519PrivateKey"].generate(), c["X25519PrivateKey"].generate()
        self._c_sk, self._s_sk = _private_bytes(c_key), _private_bytes(s_key)
        return {"c_pk": _public_bytes(c_key).hex(), "s_pk": _public_bytes(s_key).hex()}

    def _aad(self, sender: str, receiver: str) -> bytes:
        return f"cotune-secagg|{self.round}|{sender}|{receiver}".encode()

    def share(
        self, keys: Mapping[str, list[str]], nbrs: list[str], threshold: int
    ) -> dict[str, str]:
        """Encrypted shares of b_u and s_sk_u, one per neighbour (routed by the server)."""
        if self.me in nbrs or not set(nbrs) <= set(keys):
            raise ProtocolError(f"{self.me}: a neighbour list with itself or unknown keys")
        self._keys = {v: (bytes.fromhex(keys[v][0]), bytes.fromhex(keys[v][1])) for v in keys}
        self._nbrs = sorted(nbrs)
        self._b = os.urandom(32)
        holders = [self.me, *self._nbrs]  # the device keeps share 1 of its own secrets
        b_sh = split_secret(self._b, threshold, len(holders))
        s_sh = split_secret(self._s_sk, threshold, len(holders))
        self._held[self.me] = b_sh[0] + s_sh[0]
        out = {}
        for v, bs, ss in zip(holders[1:], b_sh[1:], s_sh[1:]):
            key = agree(self._c_sk, self._keys[v][0], b"cotune-secagg-enc")
            out[v] = seal(key, bs + ss, self._aad(self.me, v)).hex()
        return out

    def receive(self, sealed: Mapping[str, str]) -> None:
        """The neighbours' encrypted shares for this device."""
        for u, blob in sealed.items():
            if u not in self._keys or u == self.me:
                raise ProtocolError(f"{self.me}: a share from {u!r}, who is not a neighbour")
            key = agree(self._c_sk, self._keys[u][0], b"cotune-secagg-enc")
            self._held[u] = unseal(key, bytes.fromhex(blob), self._aad(u, self.me))

    def masked(self, encoded: torch.Tensor) -> torch.Tensor:
        """The quantized update plus its self mask and the pairwise masks (mod 2³²)."""
        y = (encoded + prg(self._b, encoded.numel())) % FIELD
        for v in self._nbrs:
            seed = agree(self._s_sk, self._keys[v][1], b"cotune-secagg-mask")
            m = prg(seed, encoded.numel())
            y = (y + m) % FIELD if self.me < v else (y - m) % FIELD
        return y

    def unmask(self, dropped: list[str], survived: list[str]) -> dict[str, str]:
        """Shares of the dropped devices' mask keys and of the survivors' self-mask seeds."""
        if set(dropped) & set(survived):
            raise ProtocolError(
                f"{self.me}: asked for both secrets of {sorted(set(dropped) & set(survived))}"
            )
        out = {}
        for u in dropped:
            if u in self._held:
                out[u] = self._held[u][33:].hex()  # the mask key's share
        for u in survived:
            if u in self._held:
                out[u] = self._held[u][:33].hex()  # the self-mask seed's share
        return out


@dataclass
class SecAggServer:
    """The server's side for one round: it only routes, sums and unmasks."""

    round: int
    threshold: int
    keys: dict[str, list[str]] = field(default_factory=dict)  # u -> [c_pk, s_pk] hex
    nbrs: dict[str, list[str]] = field(default_factory=dict)

    def route(self, outgoing: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
        """{sender: {receiver: blob}} → {receiver: {sender: blob}}."""
        inbox: dict[str, dict[str, str]] = {v: {} for v in self.nbrs}
        for u, blobs in outgoing.items():
            for v, blob in blobs.items():
                if v in inbox and v in self.nbrs.get(u, ()):
                    inbox[v][u] = blob
        return inbox

    def unmasked_sum(
        self,
        masked: Mapping[str, torch.Tensor],
        revealed: Mapping[str, Mapping[str, str]],
        shared: set[str],
    ) -> torch.Tensor:
        """The sum of the survivors' quantized updates. ``masked``: the survivors' vectors;
        ``revealed``: each responder's shares; ``shared``: who sent shares (step 2)."""
        survived = sorted(masked)
        if not survived:
            raise ProtocolError("secure aggregation: no masked update to sum")
        n = next(iter(masked.values())).numel()
        total = torch.zeros(n, dtype=torch.int64)
        for y in masked.values():
            total = (total + y) % FIELD
        for u in survived:  # remove each survivor's self mask
            b = combine_secret(self._collect(u, revealed))
            total = (total - prg(b, n)) % FIELD
        for u in sorted(shared - set(survived)):  # a dropped device's pairwise masks
            s_sk = combine_secret(self._collect(u, revealed))
            for v in self.nbrs[u]:
                if v not in masked:
                    continue
                m = prg(agree(s_sk, bytes.fromhex(self.keys[v][1]), b"cotune-secagg-mask"), n)
                # v added +m if v < u, else −m: undo it.
                total = (total - m) % FIELD if v < u else (total + m) % FIELD
        return total

    def _collect(self, u: str, revealed: Mapping[str, Mapping[str, str]]) -> list[bytes]:
        shares = [bytes.fromhex(r[u]) for r in revealed.values() if u in r]
        if len(shares) < self.threshold:
            raise ProtocolError(
                f"secure aggregation: {len(shares)} shares of {u}'s secret, {self.threshold} needed"
            )
        return shares[: self.threshold]
