"""A list option takes its items comma-separated or one item alone (``--seeds 7,8``, ``--seeds 7``),
beside jsonargparse's bracketed spelling; other options and values are left as they are."""

from __future__ import annotations

import nibabel as nib

from voxdiff.cli import build_parser, main
from voxdiff.core.cli import comma_lists


def _root():
    return build_parser()[1]


def test_list_options_take_commas_or_one_item():
    root = _root()
    cmd = ["experiment", "compare", "--out", "o"]
    assert comma_lists(cmd + ["--seeds", "7,8", "--methods", "contrastive"], root) == \
        cmd + ["--seeds", "[7,8]", "--methods", '["contrastive"]']
    assert comma_lists(cmd + ["--seeds=7,8", "--timesteps=1"], root) == cmd + ["--seeds=[7,8]", "--timesteps=[1]"]
    # the bracketed spelling, an empty list, a mapping and non-list options are untouched
    same = cmd + ["--seeds", "[7, 8]", "--label_methods", "[]", "--budget", "a,b", "--folds", "5"]
    assert comma_lists(same, root) == same
    # a list option at the end with no value is left for the parser to refuse; nothing after "--"
    assert comma_lists(cmd + ["--seeds"], root) == cmd + ["--seeds"]
    assert comma_lists(cmd + ["--", "--seeds", "1,2"], root) == cmd + ["--", "--seeds", "1,2"]
    # the top level's --quiet before the command: the command is still found
    assert comma_lists(["--quiet", *cmd, "--seeds", "7,8"], root) == ["--quiet", *cmd, "--seeds", "[7,8]"]
    # no command named: nothing to look up
    assert comma_lists(["--seeds", "1,2"], root) == ["--seeds", "1,2"]
    # a nested option of another command
    assert comma_lists(["probe", "m", "d", "--sampling.patch_size", "32,32,16"], root)[-1] == "[32,32,16]"


def test_string_items_reach_the_parser_whole(tmp_path):
    """Items of string lists are JSON strings (YAML would read '#' as a comment and ': ' as a mapping);
    an existing path is one item even with a comma in its name."""
    root = _root()
    parser = root.runners["experiment"].parsers["compare"]
    weird = tmp_path / "ct, series #2: a"
    weird.mkdir()
    argv = comma_lists(["experiment", "compare", "--out", "o", "--pretrain_data", str(weird),
                        "--methods", "contrastive, random"], root)
    ns = parser.parse_args(argv[2:])
    assert tuple(ns.pretrain_data) == (str(weird),) and tuple(ns.methods) == ("contrastive", "random")
    # names that exist nowhere are split at the commas
    argv = comma_lists(["experiment", "compare", "--out", "o", "--pretrain_data=x/a #1,y/b"], root)
    assert tuple(parser.parse_args(argv[2:]).pretrain_data) == ("x/a #1", "y/b")


def test_commas_reach_the_config(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantom", str(out), "--n_train", "1", "--n_test", "0", "--n_unlabelled", "0",
                 "--shape", "24,20,16"]) == 0
    (img,) = sorted((out / "imagesTr").glob("*.nii.gz"))
    assert nib.load(str(img)).shape == (24, 20, 16)
    capsys.readouterr()  # (the first run's progress bars)
    bad = tmp_path / "bad"
    assert main(["phantom", str(bad), "--shape", "24,x,16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("voxdiff: error: --shape") and not bad.exists()
