"""The paper's ten benchmarks (VGPO table 1, in its column order) and where their files are on disk.

| name          | column      | group  | file under --data-root   | also found as (PAPO_eval split name)       |
|---------------|-------------|--------|--------------------------|--------------------------------------------|
| `mathvista`   | MathVista   | math   | `mathvista.json`         | `AI4Math_MathVista.json`                   |
| `mathverse`   | MathVerse   | math   | `mathverse.json`         | `AI4Math_MathVerse.json`                   |
| `wemath`      | WeMath      | math   | `wemath.json`            | `We_Math.json`, `We-Math_We-Math.json`     |
| `mmk12`       | MMK12       | math   | `mmk12.json`             | `PAPO_MMK12.json`                          |
| `geomath`     | GeoMath     | math   | `geomath.json`           | `GeoMath.json` (Look-Back's eval data)     |
| `geo3k`       | Geo3k       | math   | `geo3k.json`             | `hiyouga_geometry3k.json`                  |
| `logicvista`  | LogicVista  | vision | `logicvista.json`        | `lscpku_LogicVista.json`                   |
| `counting`    | Counting    | vision | `counting.json`          | `BUAADreamer_clevr_count_70k.json`         |
| `mmmu_pro`    | MMMU-Pro    | vision | `mmmu_pro.json`          | `MMMU_MMMU_Pro.json`                       |
| `mathverse_v` | MathVerse-V | vision | `mathverse_v.json`       | `AI4Math_MathVerse_vision_dependent.json`  |

Every stem is also tried with ``.jsonl`` and ``.parquet``, and as ``data/<stem>-00000-of-00001.parquet``
(how the Hub stores a split, so that a ``huggingface-cli download`` directory, its
``<split>_images.zip`` archives beside, can be the data root); ``--files NAME=PATH`` overrides one
benchmark's file. Nine files come from PAPO-Eval (Hugging Face dataset
``PAPO-Galaxy/PAPO_eval``, one split per benchmark plus a ``<split>_images.zip``), GeoMath from
Look-Back (``ShuoY/Look-Back-eval``). Math benchmarks average into Avg-Math, vision-dependent ones into
Avg-Vision; Overall is the mean of all ten (``report.py``). Names on the command line are
case-insensitive, ``-`` and ``_`` alike, and the column titles work too (``MathVerse-V``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

PAPO_EVAL = "PAPO-Galaxy/PAPO_eval"
LOOK_BACK_EVAL = "ShuoY/Look-Back-eval"
SUFFIXES = (".json", ".jsonl", ".parquet")


class EvalError(ValueError):
    """A problem with the evaluation's inputs, named for the user (exit status 2)."""


@dataclass(frozen=True)
class Benchmark:
    key: str
    """Command-line name and default file stem."""
    column: str
    """The paper's column title."""
    group: str
    """'math' (Avg-Math) or 'vision' (Avg-Vision)."""
    aliases: tuple[str, ...]
    """Other file stems accepted under --data-root (the upstream split names)."""
    source: str
    """Where the paper's file comes from."""

    @property
    def stems(self) -> tuple[str, ...]:
        return (self.key,) + self.aliases


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("mathvista", "MathVista", "math", ("AI4Math_MathVista",), PAPO_EVAL),
    Benchmark("mathverse", "MathVerse", "math", ("AI4Math_MathVerse",), PAPO_EVAL),
    Benchmark("wemath", "WeMath", "math", ("We_Math", "We-Math_We-Math"), PAPO_EVAL),
    Benchmark("mmk12", "MMK12", "math", ("PAPO_MMK12",), PAPO_EVAL),
    Benchmark("geomath", "GeoMath", "math", ("GeoMath",), LOOK_BACK_EVAL),
    Benchmark("geo3k", "Geo3k", "math", ("hiyouga_geometry3k",), PAPO_EVAL),
    Benchmark("logicvista", "LogicVista", "vision", ("lscpku_LogicVista",), PAPO_EVAL),
    Benchmark("counting", "Counting", "vision", ("BUAADreamer_clevr_count_70k",), PAPO_EVAL),
    Benchmark("mmmu_pro", "MMMU-Pro", "vision", ("MMMU_MMMU_Pro",), PAPO_EVAL),
    Benchmark("mathverse_v", "MathVerse-V", "vision", ("AI4Math_MathVerse_vision_dependent",), PAPO_EVAL),
)
BY_KEY = {b.key: b for b in BENCHMARKS}


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


_LOOKUP = {_norm(n): b for b in BENCHMARKS for n in (b.key, b.column, *b.aliases)}


def custom_benchmark(name: str) -> Benchmark:
    """A benchmark of the user's own (``--files NAME=PATH`` with a NAME not among the ten): its own
    column after the paper's, in no average."""
    return Benchmark(_norm(name), name.strip(), "custom", (), "--files")


def select(names: Iterable[str], custom: Iterable[str] = ()) -> list[Benchmark]:
    """Benchmarks for ``--benchmarks`` (names, comma-separated lists, or ``all``): the paper's in table
    order, then the ``custom`` ones (names given a file with ``--files``) in the order named."""
    customs = {_norm(c): custom_benchmark(c) for c in custom if _norm(c) not in _LOOKUP}
    wanted = [_norm(n) for item in names for n in item.split(",") if n.strip()]
    if not wanted or "all" in wanted:
        return list(BENCHMARKS) + list(customs.values())
    unknown = [n for n in wanted if n not in _LOOKUP and n not in customs]
    if unknown:
        raise EvalError(f"unknown benchmark(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(b.key for b in BENCHMARKS)}, all, or a name given a file with --files NAME=PATH")
    chosen = {_LOOKUP[n].key for n in wanted if n in _LOOKUP}
    return [b for b in BENCHMARKS if b.key in chosen] + [customs[n] for n in dict.fromkeys(wanted) if n in customs]


def parse_file_overrides(items: Sequence[str]) -> dict[str, Path]:
    """``["geo3k=/data/geo3k.parquet", "myset=x.parquet", ...]`` -> ``{"geo3k": Path, "myset": Path}``:
    the paper's names normalised as in ``select``, any other name a custom benchmark."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path or not name.strip():
            raise EvalError(f"--files {item!r}: expected NAME=PATH")
        key = _LOOKUP[_norm(name)].key if _norm(name) in _LOOKUP else _norm(name)
        out[key] = Path(path)
    return out


HUB_SHARD = "-00000-of-00001.parquet"


def candidates(benchmark: Benchmark, data_root: Path) -> list[Path]:
    return ([data_root / f"{stem}{suffix}" for stem in benchmark.stems for suffix in SUFFIXES] +
            [data_root / "data" / f"{stem}{HUB_SHARD}" for stem in benchmark.stems])


def locate(benchmarks: Sequence[Benchmark], data_root: str | Path,
           overrides: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """The file of every benchmark; one ``EvalError`` naming every one that is missing."""
    root, overrides = Path(data_root), dict(overrides or {})
    found, missing = {}, []
    for b in benchmarks:
        tried = [overrides[b.key]] if b.key in overrides else candidates(b, root)
        hit = next((p for p in tried if p.is_file()), None)
        if hit is None:
            stems = f"{{{','.join(b.stems)}}}"
            shown = (str(tried[0]) if len(tried) == 1 else
                     f"{root}/{stems}{{{','.join(SUFFIXES)}}} or {root}/data/{stems}{HUB_SHARD}")
            missing.append(f"  {b.key} ({b.column}, from {b.source}): no {shown}")
        else:
            found[b.key] = hit
    if missing:
        raise EvalError(f"{len(missing)} benchmark file(s) missing:\n" + "\n".join(missing) +
                        "\nname a file with --files NAME=PATH, or leave the benchmark out of --benchmarks")
    return found
