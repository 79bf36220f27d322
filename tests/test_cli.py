"""``python -m quickcupy``: the options every tool spells alike (quickcupy.tools.common's parsers)."""
import json
import re

import pytest

from quickcupy import dtypes
from quickcupy.__main__ import build_parser, main
from quickcupy.tools import bench, common, llama_bench, ncu
from test_dispatch import _bench_json


def _options(command: str) -> set:
    """Every option string of one subcommand (hidden old spellings included)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {s for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("command", ["bench", "ncu", "tune", "accuracy"])
def test_m_and_shapes_are_spelled_alike(command):
    assert {"--m", "--shapes"} <= _options(command)


@pytest.mark.parametrize("command", ["bench", "tune", "llama", "generate"])
def test_dtype_is_spelled_alike(command):
    assert "--dtype" in _options(command)


@pytest.mark.parametrize("text, name", [("fp16", "float16"), ("float16", "float16"), ("bf16", "bfloat16"),
                                        ("bfloat16", "bfloat16"), (" BF16 ", "bfloat16")])
def test_parse_dtype_gives_the_library_name(text, name):
    assert common.parse_dtype(text) == name


def test_parse_dtype_refuses_others_naming_the_flag():
    with pytest.raises(common.UsageError, match=r"--dtype 'fp8' is not one of float16, fp16, half, f16, bfloat16, bf16"):
        common.parse_dtype("fp8")
    assert set(common.SHORT_DTYPES) == set(dtypes.NAMES)


@pytest.mark.parametrize("spelling", ["bf16", "bfloat16"])
def test_every_dtype_tool_normalises_at_the_parser(spelling, tmp_path):
    parse = build_parser().parse_args
    assert bench.settings(parse(["bench", "--dtype", spelling])).dtype == "bfloat16"
    assert bench.settings(parse(["bench"])).dtype == "float16"
    assert llama_bench.settings(parse(["llama", "--dtype", spelling])).dtype == "bfloat16"
    out = tmp_path / "table.json"
    assert main(["tune", "--dtype", spelling, "--points", _bench_json(tmp_path / "b.json", "bfloat16"),
                 "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["dtypes"]) == {"bfloat16"}


@pytest.mark.parametrize("argv", [["bench", "--dtype", "int8"], ["tune", "--dtype", "int8"],
                                  ["llama", "--dtype", "int8"]])
def test_a_bad_dtype_is_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--dtype 'int8' is not one of float16, fp16, half, f16, bfloat16, bf16" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["tune", "--m", "1,,2"], "--m: '1,,2' must be a comma-separated list"),
    (["tune", "--shapes", "4096"], "--shapes: '4096' is not KxN"),
    (["accuracy", "--m", "0"], "--m=0 must be >= 1"),
    (["accuracy", "--shapes", "4096x4096,4096"], "--shapes: '4096' is not KxN"),
    (["accuracy", "--shapes", "4096x4096", "--shape", "4096x4096"], "give --shapes only"),
    (["ncu", "--m", "a"], "--m: 'a' is not an integer"),
])
def test_shared_options_refuse_bad_values_in_every_tool(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_accuracy_old_shape_spelling_is_read_with_a_note(capsys):
    assert main(["accuracy", "--shape", "4096"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "python -m quickcupy accuracy: --shape 4096 is deprecated; use --shapes 4096"
    assert "--shape: '4096' is not KxN" in err[1]


def test_ncu_defaults_match_the_shared_spelling():
    s = ncu.settings(build_parser().parse_args(["ncu"]))
    assert s.M == tuple(common.parse_ms(ncu.DEFAULT_MS)) and [(s.K, s.N)] == common.parse_shapes(ncu.DEFAULT_SHAPE)


REST = re.compile(r"``|:(mod|func|data|class|meth):`")   # reST markup, meant for docstrings


@pytest.mark.parametrize("command", [None, "info", "bench", "ncu", "llama", "generate", "tune", "accuracy"])
def test_help_is_plain_text_with_a_description(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(([command] if command else []) + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert not REST.search(out), out
    description = out.split("\n\n")[1]           # the paragraph after the usage lines
    assert description[0].isupper() and description.rstrip().endswith("."), description


def test_every_command_has_its_own_one_line_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(sub.choices)
    for name, text in helps.items():
        assert text and "\n" not in text and not REST.search(text), name
        description = sub.choices[name].description
        assert description and not REST.search(description), name
