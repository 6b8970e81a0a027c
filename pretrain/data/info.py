"""`dataset.json`, the description of a shard directory: its classes, splits and shards.

`pretrain.data.write_shards` writes it; training, evaluation, export and the planner read
it through `DatasetInfo.read`, and a run keeps a copy in its run directory so that export
works without the shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pretrain.config import ConfigError

DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class Shard:
    name: str  # file name, relative to the shard directory
    samples: int
    bytes: int = 0


@dataclass(frozen=True)
class Split:
    samples: int
    shards: list[Shard]


@dataclass(frozen=True)
class DatasetInfo:
    classes: list[str]  # label i is classes[i]
    splits: dict[str, Split]  # "train", "val"
    label_map_version: str | None = None  # hash of the class list (data/labels.py)
    skipped: int = 0  # images that did not decode when the shards were written
    source: dict[str, Any] = field(default_factory=dict)  # how the shards were written

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        return self.splits.get(name, Split(0, []))

    def shard_paths(self, split: str, root: str | os.PathLike) -> list[str]:
        """Paths of a split's shards inside shard directory `root`."""
        return [str(Path(root) / s.name) for s in self.split(split).shards]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DatasetInfo":
        """From parsed JSON; a missing or malformed entry raises KeyError / TypeError / ValueError."""
        splits = {name: Split(int(s["samples"]), [Shard(str(x["name"]), int(x.get("samples", 0)), int(x.get("bytes", 0)))
                                                  for x in s["shards"]])
                  for name, s in data.get("splits", {}).items()}
        return cls(list(data["classes"]), splits, data.get("label_map_version"), int(data.get("skipped", 0)),
                   dict(data.get("source", {})))

    @classmethod
    def read(cls, directory: str | os.PathLike, source: str = "data.root",
             hint: str = "write shards with pretrain.data.write_shards") -> "DatasetInfo":
        """`directory`/dataset.json; a ConfigError naming `source`=directory if it is missing or broken."""
        if not str(directory):
            raise ConfigError(f"{source} is empty: set it to a directory written by pretrain.data.write_shards")
        path = Path(directory) / DATASET_JSON
        if not path.is_file():
            raise ConfigError(f"{source}={directory}: no {DATASET_JSON} there ({hint})")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}={directory}: {DATASET_JSON} is not valid JSON ({e.msg}, line {e.lineno})"
                              ) from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{source}={directory}: {DATASET_JSON} is malformed ({type(e).__name__}: {e})") from None

    def write(self, directory: str | os.PathLike) -> Path:
        """Write `directory`/dataset.json (replaced whole: a reader never sees half a file)."""
        path = Path(directory) / DATASET_JSON
        tmp = path.with_name(f".{DATASET_JSON}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path
