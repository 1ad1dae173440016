"""Training: data rendering and masks, chunked losses, the trainer, checkpoints and resume."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from conftest import WORDS, make_tiny_base, make_tiny_tokenizer, write_text_data
from torch.nn import functional as F

from spaf_edge.core.config import LossWeights, SpAFConfig
from spaf_edge.core.errors import ConfigError, ModelNotFoundError
from spaf_edge.model import SpAFModel
from spaf_edge.training import checkpoint as ckpt
from spaf_edge.training.data import (
    build_sequences,
    frequent_tokens,
    load_examples,
    render_chat,
    render_row,
)
from spaf_edge.training.features import (
    CachedFeatureDataset,
    batch_features,
    build_feature_cache,
    compute_base_features,
)
from spaf_edge.training.losses import chunked_distill_terms, spaf_losses
from spaf_edge.training.trainer import TrainSettings, train

pytestmark = pytest.mark.usefixtures("single_thread")



@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("data") / "text.jsonl", rows=80)


def tiny_spaf(tokenizer, config=None, seed=0):
    # A larger init gives the random base peaked next-token distributions, so KL terms are not ~0.
    base = make_tiny_base("llama", seed=seed, initializer_range=0.2, eos_token_id=tokenizer.eos_token_id)
    return SpAFModel(base, config or SpAFConfig(cutoff_layer=2, alignment_rollout_steps=2), tokenizer)


def small_settings(**changes):
    values = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup=3, eval_every=0, save_every=0,
                  eval_fraction=0.1, logit_chunk_rows=40)
    values.update(changes)
    return TrainSettings(**values)


# ---- data -------------------------------------------------------------------
def test_chat_rows_train_only_assistant_tokens(tokenizer):
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ]
    example = render_chat(messages, tokenizer)
    trained = tokenizer.decode([t for t, keep in zip(example.input_ids, example.trained) if keep])
    assert trained == "Hello!<|im_end|>\nSee you<|im_end|>\n"
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)

    dataset = build_sequences([example], seq_len=len(example.input_ids), pad_id=0, packing=False)
    mask = dataset.loss_mask[0]
    # Position t is trained when token t+1 is; the last position never is.
    assert mask[:-1].bool().tolist() == example.trained[1:]
    assert mask[-1] == 0


def test_rows_need_text_messages_or_prompt(tokenizer):
    with pytest.raises(ConfigError, match="'prompt'"):
        render_row({"question": "x"}, tokenizer)
    with pytest.raises(ConfigError, match="no assistant"):
        render_chat([{"role": "user", "content": "x"}], tokenizer)


def test_prompt_rows_are_the_rendered_user_turn_all_trained(tokenizer):
    example = render_row({"prompt": "What is two?", "source": "x"}, tokenizer)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "What is two?"}], tokenize=False)
    assert tokenizer.decode(example.input_ids) == expected
    assert all(example.trained)
    # A "text" field wins over "prompt" (the row is a document).
    assert tokenizer.decode(render_row({"prompt": "a", "text": "bcd"}, tokenizer).input_ids).startswith("bcd")


def test_gzipped_data_reads_as_the_plain_file_and_a_cut_archive_is_named(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}\u2028b"}]}
            for i in range(5)]
    plain = tmp_path / "replies.jsonl"
    plain.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    packed = tmp_path / "replies.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_examples(packed, tokenizer) == load_examples(plain, tokenizer)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(packed.read_bytes()[:-12])
    with pytest.raises(ConfigError, match="cut.jsonl.gz is not a readable gzip file"):
        load_examples(cut, tokenizer)


def test_mt_bench_data_is_refused(tmp_path, tokenizer):
    path = tmp_path / "mt_bench_question.jsonl"
    path.write_text(json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(ConfigError, match="MT-Bench"):
        load_examples(path, tokenizer)


def test_packing_and_padding(tokenizer):
    examples = [render_row({"text": text}, tokenizer) for text in ["ab cd", "efg", "hijk lm no"]]
    total = sum(len(e.input_ids) for e in examples)
    packed = build_sequences(examples, seq_len=5, pad_id=1)
    assert packed.input_ids.shape == (total // 5, 5)
    assert packed.attention_mask.all()
    assert packed.input_ids.flatten().tolist() == [t for e in examples for t in e.input_ids][: total // 5 * 5]

    padded = build_sequences(examples, seq_len=6, pad_id=1, packing=False)
    assert padded.input_ids.shape == (3, 6)
    lengths = [min(6, len(e.input_ids)) for e in examples]
    assert padded.attention_mask.sum(1).tolist() == lengths
    for row, length in enumerate(lengths):
        assert padded.loss_mask[row, length - 1:].sum() == 0  # nothing predicts padding
        assert padded.loss_mask[row, : length - 1].all()


def test_draft_vocab_is_most_frequent_targets_plus_eos(tokenizer):
    example = render_row({"text": "aaaa bb c"}, tokenizer)  # targets: a x3, space x2, b x2, c, eos
    dataset = build_sequences([example], seq_len=len(example.input_ids), pad_id=1, packing=False)
    vocab = frequent_tokens(dataset, 3, 96, always=[tokenizer.eos_token_id])
    expected = {tokenizer.convert_tokens_to_ids(t) for t in ["a", " "]} | {tokenizer.eos_token_id}
    assert set(vocab.tolist()) == expected
    assert vocab.tolist() == sorted(vocab.tolist())


# ---- losses -----------------------------------------------------------------
def reference_losses(students, teacher, weight, bias, kl_weights, ce_weights, targets):
    """Unchunked KL/CE with plain autograd."""
    teacher_logp = F.log_softmax(F.linear(teacher, weight, bias), -1)  # [N, V]
    student_logq = F.log_softmax(F.linear(students, weight, bias), -1)  # [M, N, V]
    kl = (teacher_logp.exp() * (teacher_logp - student_logq)).sum(-1)  # [M, N]
    valid = targets >= 0
    ce = -student_logq.gather(-1, targets.clamp(min=0).expand(students.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return (kl * kl_weights).sum(1), (ce * ce_weights * valid).sum(1)


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_equals_unchunked(with_bias):
    gen = torch.Generator().manual_seed(0)
    num_variants, rows, hidden, vocab = 3, 37, 8, 50
    students = torch.randn(num_variants, rows, hidden, generator=gen, dtype=torch.float64)
    teacher = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    kl_weights = torch.rand(num_variants, rows, generator=gen, dtype=torch.float64)
    kl_weights[1, 5:20] = 0
    ce_weights = torch.rand(num_variants, rows, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[3] = -1
    mix = torch.randn(2, num_variants, generator=gen, dtype=torch.float64)  # arbitrary upstream gradients

    def run(fn):
        x = students.clone().requires_grad_()
        kl, ce = fn(x)
        ((mix[0] * kl).sum() + (mix[1] * ce).sum()).backward()
        return kl.detach(), ce.detach(), x.grad

    expected = run(lambda x: reference_losses(x, teacher, weight, bias, kl_weights, ce_weights, targets))
    for chunk_rows in (1, 7, 64):
        got = run(lambda x: chunked_distill_terms(x, teacher, weight, bias, kl_weights, ce_weights, targets,
                                                  chunk_rows=chunk_rows)[:2])
        for value, reference in zip(got, expected):
            torch.testing.assert_close(value.double(), reference, rtol=1e-6, atol=1e-9)


def test_teacher_features_reproduce_base_logits(tokenizer):
    model = tiny_spaf(tokenizer)
    ids = torch.randint(0, 80, (2, 9))
    features = compute_base_features(model, ids)
    with torch.no_grad():
        logits = model.base(ids).logits
    torch.testing.assert_close(model.arch.lm_head(model.base)(features.final), logits)


def test_draft_vocab_kl_uses_teacher_renormalised_on_vd(tokenizer):
    weights = LossWeights(adapter_base=1.0, adapter_ce=0.0, alignment=0.0, alignment_token=0.0)
    model = tiny_spaf(tokenizer, SpAFConfig(cutoff_layer=2, loss_weights=weights))
    vocab = torch.tensor([3, 5, 8, 13, 21, 40])
    model.set_draft_vocab(vocab)
    ids = torch.randint(0, 80, (2, 7))
    batch = {"input_ids": ids, "loss_mask": torch.ones(2, 7)}
    features = compute_base_features(model, ids)
    got = spaf_losses(model, batch, features, chunk_rows=5)["adapter_kl/2"]
    with torch.no_grad():
        p = torch.softmax(model.base(ids).logits, -1)[..., vocab]
        p = p / p.sum(-1, keepdim=True)
        log_q = torch.log_softmax(model.draft_logits(features.cutoff[2]), -1)
        expected = (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("adapter_kind", ["bottleneck", "layer_fusion"])
def test_feature_cache_gives_the_same_losses(tokenizer, tmp_path, adapter_kind):
    """Cached features give the losses of a base forward; a layer_fusion adapter's fused states are cached too."""
    model = tiny_spaf(tokenizer, SpAFConfig(cutoff_layer=2, alignment_rollout_steps=2, adapter_kind=adapter_kind))
    examples = [render_row({"text": " ".join(WORDS)}, tokenizer)] * 3
    dataset = build_sequences(examples, seq_len=24, pad_id=1)
    folder = build_feature_cache(model, dataset, tmp_path, batch_size=2, progress=False)
    assert build_feature_cache(model, dataset, tmp_path, progress=False) == folder  # reused, not rebuilt
    assert (folder / "layer_3.npy").is_file() == (adapter_kind == "layer_fusion")
    cached = torch.utils.data.default_collate([CachedFeatureDataset(dataset, folder)[i] for i in range(2)])
    live = torch.utils.data.default_collate([dataset[i] for i in range(2)])
    with torch.no_grad():
        from_cache = spaf_losses(model, cached, batch_features(model, cached))
        from_base = spaf_losses(model, live, batch_features(model, live))
    for name in from_base:
        torch.testing.assert_close(from_cache[name], from_base[name], rtol=2e-2, atol=1e-3)


# ---- trainer ----------------------------------------------------------------
def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("adapter_kind", ["bottleneck", "fused"])
def test_training_lowers_every_loss_component(tokenizer, text_data, tmp_path, adapter_kind):
    config = SpAFConfig(cutoff_layer=2, alignment_rollout_steps=2, adapter_dim_ratio=1.0, adapter_kind=adapter_kind,
                        loss_weights=LossWeights(adapter_base=1.0, adapter_ce=0.5, alignment=1.0, alignment_token=1.0))
    model = tiny_spaf(tokenizer, config)
    settings = small_settings(steps=40, eval_every=20, lr=1e-2, warmup=2)
    result = train(model, text_data, tmp_path, settings, progress=False)
    rows = [row for row in read_log(tmp_path) if row["split"] == "train"]
    evals = [row for row in read_log(tmp_path) if row["split"] == "eval"]
    names = {"total", "adapter_kl/2", "adapter_ce/2", "align_state/2", "align_token_kl/2"}
    assert names <= set(rows[0])
    assert [row["step"] for row in rows] == list(range(1, 41))
    assert [row["step"] for row in evals] == [0, 20, 40]
    for name in names:
        start = sum(row[name] for row in rows[:5]) / 5
        end = sum(row[name] for row in rows[-5:]) / 5
        assert end < (0.8 if name == "total" else 0.95) * start, (name, start, end)
        assert evals[-1][name] < evals[0][name], name
    assert result.steps == 40
    # The final components load into a fresh model and reproduce the trained drafts.
    fresh = tiny_spaf(tokenizer, SpAFConfig(cutoff_layer=1))
    fresh.load_spaf_components(result.final)
    hidden, top = torch.randn(3, 32), torch.randn(3, 32)
    torch.testing.assert_close(fresh.draft_logits(hidden, 2, top), model.draft_logits(hidden, 2, top))


def test_fused_adapter_loss_reads_the_exact_previous_top_state(tokenizer):
    model = tiny_spaf(tokenizer, SpAFConfig(cutoff_layer=2, adapter_kind="fused", adapter_dim_ratio=1.0))
    with torch.no_grad():
        for param in model.spaf_parameters():
            param.add_(torch.randn_like(param) * 0.1)
    ids = torch.randint(0, 80, (2, 9))
    batch = {"input_ids": ids, "loss_mask": torch.ones(2, 9)}
    features = compute_base_features(model, ids)
    got = spaf_losses(model, batch, features)["adapter_kl/2"]
    with torch.no_grad():
        p = torch.softmax(model.base(ids).logits, -1)
        hidden = model.base_features(ids)
        previous_top = torch.cat([torch.zeros_like(hidden[-1][:, :1]), hidden[-1][:, :-1]], 1)
        log_q = torch.log_softmax(model.draft_logits(features.cutoff[2], prev_top=previous_top), -1)
        expected = (p * (p.log() - log_q)).sum(-1).mean()
        shifted_wrong = torch.log_softmax(model.draft_logits(features.cutoff[2], prev_top=hidden[-1]), -1)
        wrong = (p * (p.log() - shifted_wrong)).sum(-1).mean()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-7)
    assert abs(float(wrong) - float(expected)) > 1e-3  # the test can tell an off-by-one top state


class Interrupt(Exception):
    pass


def test_resume_matches_an_uninterrupted_run(tokenizer, text_data, tmp_path, monkeypatch):
    settings = small_settings(steps=10, save_every=4)
    full = tiny_spaf(tokenizer)
    train(full, text_data, tmp_path / "full", settings, progress=False)

    original = ckpt.save_checkpoint

    def save_then_stop(run_dir, model, state, run_settings):
        path = original(run_dir, model, state, run_settings)
        if state["step"] == 8:
            raise Interrupt()  # the process dies right after the step-8 checkpoint
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupt):
        train(tiny_spaf(tokenizer), text_data, tmp_path / "split", settings, progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", original)
    resumed = tiny_spaf(tokenizer, SpAFConfig(cutoff_layer=1))  # config and weights come from the checkpoint
    result = train(resumed, text_data, tmp_path / "split", settings, resume=True, progress=False)

    assert result.steps == 10
    for name, value in full.spaf_state_dict().items():
        torch.testing.assert_close(resumed.spaf_state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)
    steps = [row["step"] for row in read_log(tmp_path / "split") if row["split"] == "train"]
    assert steps == list(range(1, 11))  # no step logged twice
    full_log = [r for r in read_log(tmp_path / "full") if r["split"] == "train"]
    split_log = [r for r in read_log(tmp_path / "split") if r["split"] == "train"]
    assert [r["total"] for r in split_log] == pytest.approx([r["total"] for r in full_log], rel=1e-5)


def test_crash_during_checkpoint_keeps_the_previous_one(tokenizer, text_data, tmp_path, monkeypatch):
    calls = []
    original = ckpt.write_trainer_state

    def write_then_crash(folder, state):
        calls.append(state["step"])
        if state["step"] == 6:
            (folder / ckpt.TRAINER_STATE).write_bytes(b"half a file")
            raise Interrupt()
        original(folder, state)

    monkeypatch.setattr(ckpt, "write_trainer_state", write_then_crash)
    with pytest.raises(Interrupt):
        train(tiny_spaf(tokenizer), text_data, tmp_path, small_settings(steps=8, save_every=3), progress=False)
    assert calls == [3, 6]
    found = ckpt.find_checkpoint(tmp_path)
    assert found == tmp_path / ckpt.CHECKPOINT
    assert ckpt.load_trainer_state(found)["step"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left
    tiny_spaf(tokenizer).load_spaf_components(found / ckpt.COMPONENTS)


class OpensWhenUnpickled:
    """Unpickling this creates ``marker``: the side effect a crafted run folder could have."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_trainer_state_of_older_versions_is_refused_unread(tmp_path):
    from spaf_edge.training.trainer import train_run

    run_dir, marker = tmp_path / "run", tmp_path / "unpickled"
    checkpoint = run_dir / ckpt.CHECKPOINT
    (checkpoint / ckpt.COMPONENTS).mkdir(parents=True)
    (checkpoint / ckpt.SETTINGS).write_text("{}")
    torch.save({"step": 3, "payload": OpensWhenUnpickled(marker)}, checkpoint / ckpt.LEGACY_TRAINER_STATE)
    for attempt in (lambda: ckpt.load_trainer_state(checkpoint),
                    lambda: train_run(None, None, run_dir, resume=True),
                    lambda: train_run(None, "data.jsonl", run_dir)):
        with pytest.raises(ConfigError, match="older version.*--init-from"):
            attempt()
    assert not marker.exists(), "the pickle was loaded"


def test_trainer_state_round_trips_without_pickle(tmp_path):
    random.seed(5)
    torch.manual_seed(6)
    import numpy as np

    np.random.seed(7)
    state = {"step": 4, "optimizer": {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.randn(3, 2)}},
                                      "param_groups": [{"betas": (0.9, 0.999), "params": [0], "fused": None}]},
             "scaler": {"dtype": torch.bfloat16, "$odd": 1.5}, "rng": ckpt.rng_state(), "world_size": 1}
    expected = (random.random(), torch.rand(2).tolist(), np.random.rand())
    ckpt.write_trainer_state(tmp_path, state)
    assert "$tensor" in (tmp_path / ckpt.TRAINER_STATE).read_text()  # tensors live in the safetensors file
    loaded = ckpt.load_trainer_state(tmp_path)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # int keys, tuples kept
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert loaded["scaler"] == state["scaler"]
    random.seed(0)
    torch.manual_seed(0)
    np.random.seed(0)
    ckpt.restore_rng_state(loaded["rng"])
    assert (random.random(), torch.rand(2).tolist(), np.random.rand()) == expected
    with pytest.raises(TypeError, match=r"state.bad: a object"):
        ckpt.write_trainer_state(tmp_path, {"step": 1, "bad": object()})


def test_corrupt_trainer_state_is_one_clear_error(tmp_path):
    ckpt.write_trainer_state(tmp_path, {"step": 2})
    for text in ("not json", '{"format": 1, "state": {"step": {"$tensor": "9"}}}', "[]"):
        (tmp_path / ckpt.TRAINER_STATE).write_text(text)
        with pytest.raises(ModelNotFoundError, match="corrupt"):
            ckpt.load_trainer_state(tmp_path)


def test_draft_vocab_is_built_from_data_and_saved(tokenizer, text_data, tmp_path):
    config = SpAFConfig(cutoff_layer=2, draft_vocab_size=12)
    model = tiny_spaf(tokenizer, config)
    result = train(model, text_data, tmp_path, small_settings(steps=2), progress=False)
    assert model.draft_vocab.numel() == 12
    assert tokenizer.eos_token_id in model.draft_vocab.tolist()
    fresh = tiny_spaf(tokenizer)
    fresh.load_spaf_components(result.final)
    assert fresh.draft_vocab.tolist() == model.draft_vocab.tolist()


class TickingClock:
    """A perf_counter that advances a fixed amount per call: every step 'takes' the same time."""

    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def perf_counter(self):
        self.now += self.tick
        return self.now


def test_time_budget_cuts_steps_and_the_schedule_follows(tokenizer, text_data, tmp_path, monkeypatch):
    from spaf_edge.training import trainer

    clock = TickingClock(0.25)
    monkeypatch.setattr(trainer, "time", clock)
    settings = small_settings(steps=500, warmup=2, time_budget=40.0)
    result = train(tiny_spaf(tokenizer), text_data, tmp_path, settings, progress=False)
    rows = read_log(tmp_path)
    budget = [row for row in rows if row["split"] == "budget"]
    assert len(budget) == 1 and budget[0]["step"] == 25 and budget[0]["planned_steps"] == 500
    assert 25 < result.steps == budget[0]["steps"] < 500
    train_rows = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in train_rows] == list(range(1, result.steps + 1))
    # The cosine schedule was re-planned for the cut: its last step is near the floor.
    assert train_rows[-1]["lr"] == pytest.approx(settings.lr * settings.min_lr_ratio, rel=0.05)
    assert clock.now <= 40.0 * 1.1  # the loop ended close to the budget
    # A resume continues the cut schedule: the saved settings hold the new step count and no budget.
    saved = json.loads((tmp_path / ckpt.SETTINGS).read_text())["train"]
    assert saved["steps"] == result.steps and saved["time_budget"] is None


class ShiftingClock(TickingClock):
    """A TickingClock whose tick changes once the clock passes ``at`` seconds: the machine got busier or quieter."""

    def __init__(self, tick, at, later_tick):
        super().__init__(tick)
        self.at, self.later_tick = at, later_tick

    def perf_counter(self):
        if self.now >= self.at:
            self.tick = self.later_tick
        return super().perf_counter()


@pytest.mark.parametrize("before, after", [(0.5, 0.1), (0.1, 0.4)], ids=["probe-while-busy", "busy-after-probe"])
def test_time_budget_is_replanned_when_the_step_time_changes(tokenizer, text_data, tmp_path, monkeypatch, before,
                                                             after):
    from spaf_edge.training import trainer

    budget = 120.0
    clock = ShiftingClock(before, at=30.0 * before, later_tick=after)  # shifts in the probe's window (steps 5-25)
    monkeypatch.setattr(trainer, "time", clock)
    result = train(tiny_spaf(tokenizer), text_data, tmp_path, small_settings(steps=4000, warmup=2, time_budget=budget),
                   progress=False)
    plans = [row for row in read_log(tmp_path) if row["split"] == "budget"]
    assert plans[0]["step"] == 25 and len(plans) >= 2, "the plan was checked again after the probe"
    first, last = plans[0]["steps"], plans[-1]["steps"]
    assert (last > first) if after < before else (last < first)
    assert result.steps == last <= 4000
    # The run used its budget without overrunning it (5 % is kept for evals and saves).
    assert 0.8 * budget <= clock.now <= 1.05 * budget


def test_time_budget_longer_than_the_run_changes_nothing(tokenizer, text_data, tmp_path):
    result = train(tiny_spaf(tokenizer), text_data, tmp_path, small_settings(steps=30, time_budget=3600.0),
                   progress=False)
    assert result.steps == 30
    assert not [row for row in read_log(tmp_path) if row["split"] == "budget"]


def test_time_budget_must_be_positive():
    with pytest.raises(ConfigError, match="time_budget"):
        small_settings(time_budget=0.0).validate()
