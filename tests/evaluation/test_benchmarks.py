"""Benchmark names, file lookup under --data-root, and the one error that names every missing file."""

from __future__ import annotations

import pytest

from megatron_vgpo.evaluate import main
from megatron_vgpo.evaluation import BENCHMARKS, EvalError, locate, select
from megatron_vgpo.evaluation.benchmarks import parse_file_overrides


def test_ten_benchmarks_in_table_order():
    assert [b.column for b in BENCHMARKS] == ["MathVista", "MathVerse", "WeMath", "MMK12", "GeoMath", "Geo3k",
                                              "LogicVista", "Counting", "MMMU-Pro", "MathVerse-V"]
    assert [b.group for b in BENCHMARKS] == ["math"] * 6 + ["vision"] * 4


def test_select_names_aliases_and_order():
    assert [b.key for b in select(["all"])] == [b.key for b in BENCHMARKS]
    assert [b.key for b in select(["geo3k,MathVerse-V", "mathvista", "MMMU_Pro"])] == [
        "mathvista", "geo3k", "mmmu_pro", "mathverse_v"]  # table order, whatever the order given
    assert [b.key for b in select(["hiyouga_geometry3k"])] == ["geo3k"]
    with pytest.raises(EvalError, match="unknown benchmark.*mathvistaa"):
        select(["mathvistaa"])


def test_locate_by_name_alias_suffix_and_override(tmp_path):
    (tmp_path / "mathvista.json").write_text("[]")
    (tmp_path / "hiyouga_geometry3k.parquet").write_text("")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "MMMU_MMMU_Pro-00000-of-00001.parquet").write_text("")  # as the Hub stores it
    other = tmp_path / "elsewhere" / "c.jsonl"
    other.parent.mkdir()
    other.write_text("")
    found = locate(select(["mathvista", "geo3k", "counting", "mmmu_pro"]), tmp_path,
                   parse_file_overrides([f"Counting={other}"]))
    assert found == {"mathvista": tmp_path / "mathvista.json", "geo3k": tmp_path / "hiyouga_geometry3k.parquet",
                     "counting": other, "mmmu_pro": tmp_path / "data" / "MMMU_MMMU_Pro-00000-of-00001.parquet"}


def test_every_missing_file_is_named(tmp_path):
    (tmp_path / "mathvista.json").write_text("[]")
    with pytest.raises(EvalError) as e:
        locate(select(["all"]), tmp_path, parse_file_overrides([f"geo3k={tmp_path / 'nope.json'}"]))
    message = str(e.value)
    assert message.startswith("9 benchmark file(s) missing:")
    for b in BENCHMARKS[1:]:
        assert f"  {b.key} ({b.column}, from " in message
    assert "mathvista (" not in message and f"no {tmp_path / 'nope.json'}" in message
    assert (f"no {tmp_path}/{{wemath,We_Math,We-Math_We-Math}}{{.json,.jsonl,.parquet}} or "
            f"{tmp_path}/data/{{wemath,We_Math,We-Math_We-Math}}-00000-of-00001.parquet") in message


def test_cli_names_missing_files_and_exits_2(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--data-root", str(tmp_path), "--benchmarks", "geomath", "counting",
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "evaluate: error: 2 benchmark file(s) missing:" in err
    assert "geomath (GeoMath, from ShuoY/Look-Back-eval)" in err and "counting (Counting, from PAPO-Galaxy" in err


def test_bad_options(tmp_path):
    with pytest.raises(EvalError, match="--files 'geo3k': expected NAME=PATH"):
        parse_file_overrides(["geo3k"])
    assert main(["--model", "m", "--samples", "4"]) == 2  # avg@k at temperature 0
