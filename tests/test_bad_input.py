"""A corpus of bad inputs: each gets a clear message and none costs the run (issue: never lose a run)."""
from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from eridiffusion import cli

from .conftest import train_config


def write_corpus(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = lambda w, h: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    rgb(64, 64).save(folder / "good.png")
    (folder / "good.txt").write_text("a good image")
    (folder / "zero.png").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(rng.bytes(2000))
    buf = io.BytesIO()
    rgb(64, 64).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rgb(64, 64).convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "cmyk.txt").write_bytes("caf\xe9 au lait, latin-1 caption".encode("latin-1"))  # not UTF-8
    Image.fromarray((rng.integers(0, 65535, (64, 48))).astype(np.uint16)).save(folder / "sixteen_bit.png")
    (folder / "sixteen_bit.txt").write_text("")  # empty caption
    rgb(64, 64).convert("P").save(folder / "palette.png")
    (folder / "palette.txt").write_text(" ".join(["word"] * 3000))  # far past the text encoders' limits
    rgb(48, 64).convert("L").save(folder / "gray.webp")
    rgb(1600, 1200).save(folder / "huge.jpg")
    rgb(3, 5).save(folder / "tiny.png")
    return folder


def test_a_corpus_of_bad_images_and_captions_still_trains(tiny_flux, tmp_path, write_config, caplog):
    data = write_corpus(tmp_path / "data")
    cfg = train_config(tiny_flux, data, tmp_path / "out", steps=3, sample={"prompts": []})
    with caplog.at_level(logging.WARNING):
        assert cli.main([str(write_config(cfg))]) == 0
    err = caplog.text
    assert "skipped 3 of 10 images" in err and "zero.png" in err and "corrupt.jpg" in err and "truncated.jpg" in err
    assert (tmp_path / "out" / "test_lora" / "test_lora.safetensors").is_file()


def test_folders_without_usable_images_are_named(tiny_flux, tmp_path, write_config, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert cli.main([str(write_config(train_config(tiny_flux, empty, tmp_path / "out")))]) == 1
    assert str(empty) in capsys.readouterr().err
    missing = tmp_path / "does-not-exist"
    assert cli.main([str(write_config(train_config(tiny_flux, missing, tmp_path / "out"), "b.yaml"))]) == 1
    assert str(missing) in capsys.readouterr().err


def test_wrong_typed_and_out_of_range_values(tiny_flux, dataset, tmp_path, write_config, capsys):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", train={"lr": -1e-4, "steps": "many"}, network={"linear": 0})
    assert cli.main([str(write_config(cfg))]) == 1
    err = capsys.readouterr().err
    assert "train.lr" in err and "train.steps" in err and "network.linear" in err


def test_run_names_cannot_escape_the_training_folder(tiny_flux, dataset, tmp_path, write_config, capsys):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", name="../../escape")
    assert cli.main([str(write_config(cfg))]) == 1
    assert "cannot be used as a folder name" in capsys.readouterr().err
    assert not (tmp_path / "escape").exists()
