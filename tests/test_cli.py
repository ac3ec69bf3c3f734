"""The command lines of train, sample, summary and eval: a mistake is one line and exit 2, --help shows
every default, summary has its own parser and reads checkpoints."""
import argparse

import pytest

from gan_fast import eval as eval_cli
from gan_fast import sample, summary
from gan_fast.config import given_flags
from gan_fast.train import build_parser as train_parser
from gan_fast.train import main as train_main

from .conftest import TINY, run_module

PARSERS = {"train": train_parser, "sample": sample.build_parser, "summary": summary.build_parser,
           "eval": eval_cli.build_parser}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert train_main([*TINY, "--steps", "2", "--out", out]) == 0
    return out


@pytest.mark.parametrize("module,args,message", [
    ("gan_fast.train", ["--channels", "2"], "argument --channels: invalid choice: 2 (choose from 1, 3)"),
    ("gan_fast.train", ["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ("gan_fast.train", ["--steps", "3", "--epochs", "1"], "argument --epochs: not allowed with argument --steps"),
    # no abbreviations: a prefix of a longer flag was taken for it (--checkpoint for --checkpoint-every)
    ("gan_fast.train", ["--checkpoint", "runs/dcgan"], "unrecognized arguments: --checkpoint runs/dcgan"),
    ("gan_fast.sample", [], "one of the arguments --checkpoint --netG is required"),
    # sample builds G only: D's width is not one of its flags
    ("gan_fast.sample", ["--checkpoint", "runs/dcgan", "--ndf", "4"], "unrecognized arguments: --ndf 4"),
    ("gan_fast.summary", ["--checkpoint-every", "5"], "unrecognized arguments: --checkpoint-every 5"),
    ("gan_fast.eval", ["--n", "x", "--references"], "argument --n: invalid int value: 'x'"),
])
def test_parser_error_is_one_line_exit_2(module, args, message):
    r = run_module(module, *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"error: {message}; see python -m {module} --help\n"
    assert r.stdout == ""


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return formatter.format_help()


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_shows_every_default(name):
    parser = PARSERS[name]()
    required = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    checked = 0
    for action in parser._actions:
        if action.nargs == 0 or action in required or not action.option_strings:
            continue  # switches (off by default) and the one-of-these-is-required sources
        text = " ".join(_help_of(parser, action).split())
        assert "default" in text, f"{name} {'/'.join(action.option_strings)} shows no default: {text}"
        checked += 1
    assert checked >= 4


def test_help_default_values():
    text = " ".join(train_parser().format_help().split())
    for shown in ("--batch-size BATCH_SIZE images per step (per rank under torchrun) (default: 64)",
                  "--lr LR Adam learning rate of G and D (default: 0.0002)",
                  "--seed SEED seeds the weights, the noise and the data order (default: 0)",
                  "--steps STEPS number of G updates (default: 1500, unless --epochs)"):
        assert shown in text
    text = " ".join(eval_cli.build_parser().format_help().split())
    assert "--batch-size BATCH_SIZE (default: 250)" in text  # a flag without help text still shows it


def test_summary_reads_a_checkpoint(run_dir):
    r = run_module("gan_fast.summary", "--checkpoint", run_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{run_dir}/checkpoint.pt: step 2\n")
    # the run's models (TINY: --image-size 16 --nz 8 --ngf 4), not the flags' defaults (32, 64, 32)
    assert "Generator (dcgan)  input [2, 8, 1, 1]" in r.stdout
    assert "Discriminator (dcgan)  input [2, 1, 16, 16]" in r.stdout
    same = run_module("gan_fast.summary", *TINY[:8])  # the same model from its flags
    assert r.stdout.split("\n", 2)[2] == same.stdout


def test_summary_checkpoint_with_model_flags_is_an_error(run_dir):
    r = run_module("gan_fast.summary", "--checkpoint", run_dir, "--image-size", "16")
    assert r.returncode == 2
    assert r.stderr == "error: --checkpoint brings its own model: drop --image-size\n"


def test_resume_conflict_grammar(run_dir):
    r = run_module("gan_fast.train", *TINY, "--image-size", "32", "--resume", run_dir, "--out", run_dir)
    assert r.returncode == 2
    assert "--resume: --image-size differs from the checkpoint's run; drop it to continue it" in r.stderr
    r = run_module("gan_fast.train", *TINY, "--image-size", "32", "--nz", "16", "--resume", run_dir,
                   "--out", run_dir)
    assert r.returncode == 2
    assert "--resume: --image-size, --nz differ from the checkpoint's run; drop them to continue it" in r.stderr


def test_given_flags_counts_a_flag_given_with_its_default_value():
    parser = train_parser()
    # --lr at its default value still counts: on --resume it is checked against the checkpoint's run
    assert given_flags(parser, ["--lr", "0.0002", "--resume", "--fused"]) == {"lr", "resume", "fused"}
    assert given_flags(parser, []) == set()
    assert parser.parse_args([]).lr == 2e-4  # the parser is left as it was
