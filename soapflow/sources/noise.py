"""``noise:<generator>[?key=value&...]``: synthetic images from ``noise_generators``."""

from __future__ import annotations

import numpy as np
import torch

from soapflow import noise_generators
from soapflow.errors import SoapError
from soapflow.sources.base import Source, _indices, _jsonable

def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _parse_noise_spec(spec: str) -> tuple[str, dict]:
    body = spec[len("noise:") :]
    name, _, query = body.partition("?")
    name = name.strip()
    if not name:
        raise SoapError(f"noise source {spec!r} names no generator; use noise:<generator>, e.g. noise:pink")
    params = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise SoapError(f"bad noise parameter {part!r} in {spec!r}; use noise:{name}?key=value&key2=1,2,3")
        values = [_parse_value(v.strip()) for v in value.split(",")]
        params[key.strip()] = values[0] if len(values) == 1 else values
    return name, params


class NoiseDataset(torch.utils.data.Dataset):
    """Item ``i`` = ``noise_generators.generate(name, 1, size, start=i, ...)[0]`` on CPU."""

    def __init__(self, name, params, seed, count, image_size, mean, std):
        self.name, self.params, self.seed, self.count = name, dict(params), int(seed), int(count)
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self.generate(i, 1, "cpu")[0]

    def generate(self, start: int, count: int, device) -> torch.Tensor:
        x = noise_generators.generate(
            self.name, count, self.image_size, seed=self.seed, start=start, device=device,
            mean=self.mean, std=self.std, **self.params,
        )  # fmt: skip
        return x.to(torch.float32)


class NoiseSource(Source):
    def __init__(self, spec: str, n: int | None, seed: int):
        super().__init__(spec, "noise")
        if n is None:
            raise SoapError(f"noise source {spec!r} needs n (how many images to generate)")
        name, params = _parse_noise_spec(spec)
        try:
            resolved = noise_generators.generator_params(name, **params)
        except (KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise SoapError(f"noise source {spec!r}: {msg}") from e
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise SoapError(f"seed must be an integer, got {seed!r}")
        self.generator = name
        self.params = params
        self.seed = int(seed)
        self.count = n
        self._fingerprint = {
            "kind": "noise",
            "spec": spec,
            "generator": name,
            "params": _jsonable(resolved),
            "seed": self.seed,
            "count": n,
        }

    def __len__(self) -> int:
        return self.count

    def dataset(self, image_size, mean, std, interpolation="bicubic"):
        return NoiseDataset(self.generator, self.params, self.seed, self.count, image_size, mean, std)

    def batch(self, indices, image_size, mean, std, device="cpu") -> torch.Tensor:
        idx = _indices(indices, len(self))
        ds = self.dataset(image_size, mean, std)
        if not idx:
            return torch.empty((0, 3, image_size, image_size), dtype=torch.float32, device=device)
        # One generate() call per contiguous run of the sorted, de-duplicated indices,
        # then reorder: the same index set gives the same tensors whatever its order.
        uniq = sorted(set(idx))
        parts, run_start, prev = [], uniq[0], uniq[0]
        for i in uniq[1:] + [None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            parts.append(ds.generate(run_start, prev - run_start + 1, device))
            if i is not None:
                run_start = prev = i
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if idx != uniq:
            pos = {v: k for k, v in enumerate(uniq)}
            out = out[torch.tensor([pos[i] for i in idx], device=out.device)]
        return out
