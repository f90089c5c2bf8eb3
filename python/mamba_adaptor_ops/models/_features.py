"""`FeatureInfo`: what each feature map of a backbone holds, as timm describes it."""

from __future__ import annotations


class FeatureInfo(list):
    """A list of dicts {"num_chs", "reduction", "module", "index"}, one per feature map, with timm's accessors.

    `channels()`, `reduction()` and `module_name()` return one entry per map (or the entry `idx`).
    """

    def channels(self, idx: int | None = None) -> list[int] | int:
        return self._get("num_chs", idx)

    def reduction(self, idx: int | None = None) -> list[int] | int:
        return self._get("reduction", idx)

    def module_name(self, idx: int | None = None) -> list[str] | str:
        return self._get("module", idx)

    def _get(self, key: str, idx: int | None):
        return [info[key] for info in self] if idx is None else self[idx][key]


__all__ = ["FeatureInfo"]
