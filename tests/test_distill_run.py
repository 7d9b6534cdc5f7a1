"""The distillation loop: resume after a kill, NaN stop, evaluation hook, config errors, and a short
run that lowers the matching loss (on a small learnable synthetic dataset with toy experts; the
embedded default needs the data, experts and evaluator stages)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from distill_toys import expert_trajectory, paired_data, tiny_student
from lors.config import DistillSetting
from lors.distill import METHODS, run_distillation
from lors.distill.matching import MatchResult, tesla_iteration, walk_batches
from lors.distill.run import CheckpointStore, Distiller, distill_loop
from lors.distill.synthetic import (LearnableSet, build_method_similarity, n_synthetic_pairs, noise_init,
                                    real_init)
from lors.distill.trajectories import ExpertPool
from lors.errors import ConfigError, DataError, LorsError

SETTING = dict(lr_img=50.0, lr_txt=50.0, lr_sim=5.0, lr_lr=1e-3, rank=2, alpha=1.0, mini_batch=4, syn_steps=2,
               max_start_epoch=2, expert_epochs=1, iterations=5, eval_every=0)


@pytest.fixture(scope="module")
def world():
    """Real pairs, a float32 student with dropout on (so RNG restoration matters), two experts."""
    student = tiny_student("conv", dropout=0.1, dtype=torch.float32)
    images, texts, labels = paired_data(64, seed=0, dtype=torch.float32)
    experts = [expert_trajectory(student, images, texts, epochs=3, lr=0.5, seed=s) for s in range(2)]
    return student, images, texts, labels, experts


def make_distiller(world, method: str, n: int = 8, seed: int = 0, **overrides) -> Distiller:
    student, images, texts, _, experts = world
    setting = DistillSetting(**{**SETTING, **overrides})
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    syn_images, syn_texts = images[:n], texts[:n]
    syn = LearnableSet(syn_images, syn_texts, build_method_similarity(method, setting, n), setting.init_lr)
    numels = (student.image_layout.numel, student.text_layout.numel)
    pool = ExpertPool(experts, setting.max_start_epoch + setting.expert_epochs, numels, torch.device("cpu"))
    return Distiller(method, student, syn, pool, setting, "reference", generator)


def final_state(distiller: Distiller) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in distiller.syn.state_dict().items()}


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["lors", "mtt_vl"])
def test_resume_after_kill_equals_uninterrupted_run(world, tmp_path, method, caplog):
    straight = make_distiller(world, method)
    full = distill_loop(straight, iterations=4, protocol="reference",
                        store=CheckpointStore(tmp_path / "a", "fp"), checkpoint_every=2)
    assert len(full.history) == 5  # reference protocol: iterations + 1 updates

    def kill_at_3(synset, it):
        if it == 3:
            raise Killed
        return {}

    store = CheckpointStore(tmp_path / "b", "fp")
    with pytest.raises(Killed):
        distill_loop(make_distiller(world, method), iterations=4, protocol="reference", store=store,
                     checkpoint_every=2, eval_every=1, eval_hook=kill_at_3)
    assert [p.name for p in store.paths()] == ["state-0000002.pt"]
    resumed = make_distiller(world, method)
    with caplog.at_level(logging.INFO, logger="lors.distill.run"):
        rest = distill_loop(resumed, iterations=4, protocol="reference", store=store, checkpoint_every=2)
    assert "resuming from the checkpoint at iteration 2" in caplog.text
    assert [r["iteration"] for r in rest.history] == [0, 1, 2, 3, 4]
    assert [r["matching_loss"] for r in rest.history] == [r["matching_loss"] for r in full.history]
    for key, value in final_state(straight).items():
        torch.testing.assert_close(final_state(resumed)[key], value, rtol=0, atol=0)


def test_clean_protocol_runs_iterations_updates_and_evaluates_the_final_set(world, tmp_path):
    seen = []

    def hook(synset, it):
        seen.append((it, synset.meta["iterations"], len(synset)))
        return {"summary": {"last": {"r_mean": {"mean": 1.0, "std": 0.0}}}}

    result = distill_loop(make_distiller(world, "tesla_vl"), iterations=3, protocol="clean",
                          store=CheckpointStore(tmp_path, "fp"), checkpoint_every=10, eval_every=3, eval_hook=hook)
    assert len(result.history) == 3
    assert seen == [(0, 0, 8), (3, 3, 8)]
    assert [e["iteration"] for e in result.evaluations] == [0, 3]


def test_evaluation_does_not_change_the_distillation(world, tmp_path):
    def noisy_hook(synset, it):
        torch.rand(100)  # consumes global RNG, which the loop must shield
        return {}

    quiet = distill_loop(make_distiller(world, "lors"), iterations=2, protocol="reference",
                         store=CheckpointStore(tmp_path / "a", "fp"), checkpoint_every=10)
    noisy = distill_loop(make_distiller(world, "lors"), iterations=2, protocol="reference",
                         store=CheckpointStore(tmp_path / "b", "fp"), checkpoint_every=10,
                         eval_every=1, eval_hook=noisy_hook)
    assert [r["matching_loss"] for r in quiet.history] == [r["matching_loss"] for r in noisy.history]


def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(world, tmp_path):
    distiller = make_distiller(world, "lors")
    real_match, calls = distiller.match, []

    def match():
        calls.append(1)
        result = real_match()
        return MatchResult(float("nan"), result.loss_img, float("nan")) if len(calls) == 4 else result

    distiller.match = match
    store = CheckpointStore(tmp_path, "fp")
    with pytest.raises(LorsError, match=r"toy: matching loss is nan at iteration 3; .*state-0000002\.pt") as err:
        distill_loop(distiller, iterations=10, protocol="reference", store=store, checkpoint_every=2, label="toy")
    assert "\n" not in str(err.value)
    assert [p.name for p in store.paths()] == ["state-0000002.pt"]
    assert torch.load(store.paths()[0], weights_only=False)["iteration"] == 2


def test_degenerate_expert_segment_gives_a_non_finite_loss(world):
    student, images, texts, _, experts = world
    syn = LearnableSet(images[:4], texts[:4], build_method_similarity("lors", DistillSetting(rank=2), 4), 0.1)
    traj = experts[0]
    from lors.distill.trajectories import Segment

    segment = Segment(traj.image[0], traj.text[0], traj.image[0], traj.text[0])  # D = 0
    result = tesla_iteration(student, syn, segment, walk_batches(4, 4, 1, torch.Generator()), loss="wbce",
                             temperature=0.07, merge_branches=False)
    assert not torch.isfinite(torch.tensor(result.loss))


def test_checkpoint_of_another_configuration_is_ignored(world, tmp_path):
    distill_loop(make_distiller(world, "tesla_vl"), iterations=1, protocol="reference",
                 store=CheckpointStore(tmp_path, "old"), checkpoint_every=1)
    result = distill_loop(make_distiller(world, "tesla_vl"), iterations=1, protocol="reference",
                          store=CheckpointStore(tmp_path, "new"), checkpoint_every=1)
    assert [r["iteration"] for r in result.history] == [0, 1]


def test_expert_pool_round_robin_reshuffles_and_validates(world):
    student, *_, experts = world
    numels = (student.image_layout.numel, student.text_layout.numel)
    pool = ExpertPool(experts * 2, 3, numels, torch.device("cpu"), cache_size=2)
    g = torch.Generator().manual_seed(0)
    first_pass = [pool.next_expert(g) for _ in range(4)]
    second_pass = [pool.next_expert(g) for _ in range(4)]
    assert sorted(first_pass) == sorted(second_pass) == [0, 1, 2, 3]
    for index in range(4):
        pool.trajectory(index)
    assert list(pool._cache) == [2, 3]
    with pytest.raises(DataError, match="expert 0: 4 image snapshots, distillation needs 5"):
        ExpertPool(experts, 5, numels, torch.device("cpu")).trajectory(0)
    with pytest.raises(DataError, match="expert 0: image snapshots have shape"):
        ExpertPool(experts, 3, (7, numels[1]), torch.device("cpu")).trajectory(0)


def test_initialisation_budget_and_noise():
    assert n_synthetic_pairs("lors", 100, "reference") == 99
    assert n_synthetic_pairs("lors", 100, "clean") == 100
    assert n_synthetic_pairs("mtt_vl", 100, "reference") == 100
    images_uint8 = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8).numpy()
    txt2img = torch.tensor([0, 0, 1, 2, 3, 4, 4]).numpy()
    features = torch.randn(7, 3)
    images, texts, rows = real_init(images_uint8, txt2img, features, 4, torch.Generator().manual_seed(0), None)
    assert len(set(rows.tolist())) == 4
    torch.testing.assert_close(texts, features[rows])
    from lors.data.transforms import normalize

    torch.testing.assert_close(images, normalize(torch.as_tensor(images_uint8[txt2img[rows.numpy()]])))
    with pytest.raises(ConfigError, match="needs 8 pairs but the training split has only 7 caption rows"):
        real_init(images_uint8, txt2img, features, 8, torch.Generator(), None)
    with pytest.raises(ConfigError, match="at least one synthetic pair"):  # LoRS at budget 1 pays it all for S~
        real_init(images_uint8, txt2img, features, n_synthetic_pairs("lors", 1, "reference"), torch.Generator(), None)
    noise_images, noise_texts = noise_init(2000, 4, 3, torch.Generator().manual_seed(0))
    assert noise_images[:, 0].mean().item() == pytest.approx(-0.0626, abs=0.02)
    assert noise_images[:, 2].std().item() == pytest.approx(1.0539, abs=0.02)
    assert noise_texts.std().item() == pytest.approx(0.5253, abs=0.02)


def test_unknown_method_is_a_config_error(tiny_params):
    assert METHODS == ("lors", "tesla_vl", "mtt_vl")
    with pytest.raises(ConfigError, match="unknown distillation method 'dm'"):
        run_distillation(tiny_params, "embedded", 20, "dm")


# ---- a short distillation learns ------------------------------------------------------------------

def fixed_matching_loss(distiller: Distiller) -> float:
    """Mean matching loss over every (expert, start) segment with fixed batches and no dropout noise."""
    syn = copy.deepcopy(distiller.syn)
    torch.manual_seed(0)  # same dropout masks for the before and after measurements
    losses = []
    for index in range(len(distiller.experts)):
        image, text = distiller.experts.trajectory(index)
        for start in range(distiller.setting.max_start_epoch):
            from lors.distill.trajectories import Segment

            segment = Segment(image[start], text[start], image[start + 1], text[start + 1])
            batches = walk_batches(len(syn), 4, 2, torch.Generator().manual_seed(start))
            losses.append(tesla_iteration(distiller.student, syn, segment, batches, loss="wbce",
                                          temperature=0.07, merge_branches=False).loss)
    return sum(losses) / len(losses)


def test_short_lors_distillation_lowers_the_matching_loss(world, tmp_path):
    distiller = make_distiller(world, "lors", n=8, seed=1, iterations=15)
    before = fixed_matching_loss(distiller)
    distill_loop(distiller, iterations=15, protocol="reference", store=CheckpointStore(tmp_path, "fp"),
                 checkpoint_every=100)
    after = fixed_matching_loss(distiller)
    assert after < 0.9 * before, (before, after)
