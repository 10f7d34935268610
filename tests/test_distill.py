"""Distillation recipes: progressive (Salimans & Ho 2022) and adversarial (SDXL-Lightning, Lin et al. 2024).

Fast: the Algorithm 2 target is exact (a student that outputs it samples in N DDIM steps what the teacher
samples in 2N, to float64 precision), the loss weightings, the discriminator (range, shapes, a trainable
copy of the frozen teacher's encoder), L_D / L_G, the teacher's checkpoint round trip and recipe checks.

Slow (`ray_cluster`, `orchestration.launch.train`, 2 CPU workers, DeepSpeed ZeRO-2): each recipe runs in
two launches of the same name (the second resumes), then its student is compared with the teacher that
the session fixture `distill_teacher` trained in-process: samples from the same noise and prompts, MSE
against the teacher's 32-step samples and KID to the data (nuance's quality metric, `nuance eval`): the
4-step student must be closer in both than the teacher's own 4 steps. At 8 px: tests/distill_fixtures.py
says why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from nuance.orchestration.recipe import RecipeError, load_recipe
from nuance.trainers import distill
from nuance.trainers.config import ModelConfig
from nuance.trainers.diffusion import DDPMObjective, DiscreteSchedule
from nuance.trainers.discriminator import Discriminator, discriminator_loss, generator_loss
from nuance.trainers.models.backbone import build_backbone
from nuance.trainers.quality import Evaluator
from tests.distill_fixtures import DISTILL_OVERRIDES, debug_recipe

EVAL_PROMPTS = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square")]
EVAL_PER_PROMPT = 64  # 512 samples: at 8 px they cost ~3 s (teacher 32 + 4 steps, student 4)
KID_SUBSETS = 200  # nuance eval's KID estimator, 10x its subsets: less noise from the choice of subsets
# The students' 4-step KID must be below the teacher's 4-step KID by KID_MARGIN. Measured over 4 seeds of
# the teacher's and students' training x 5 sample seeds (512 samples each): a model's KID varies with the
# sample seed by sd 0.002-0.005, the teacher-minus-student difference by sd 0.002-0.004 at one training;
# teacher 4 steps minus student 4 steps over all 20: progressive mean 0.031 (sd 0.010, min 0.018),
# adversarial 0.033 (sd 0.004, min 0.026); the teacher's 4 minus its 32 steps: mean 0.037 (min 0.025).
KID_MARGIN = 0.01


@pytest.fixture(autouse=True)
def _one_thread():
    """On 2 shared cores a second torch thread mostly waits for other processes (several x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- Algorithm 2 is exact ---------------------------------------------------------------------------------
class ToyNet(nn.Module):
    """A fixed nonlinear 'network' f(x, t) in float64: a stand-in teacher with a curved probability flow."""

    def __init__(self, channels: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mix = nn.Parameter(torch.randn(channels, channels, generator=g, dtype=torch.float64) / 2)

    def forward(self, x, t, **cond):
        tt = (t.to(x.dtype) / 1000).reshape(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("ij,bjhw->bihw", self.mix, x) * (1 + tt)) + 0.3 * tt * x


def _schedule(zero_terminal_snr: bool) -> DiscreteSchedule:
    return DiscreteSchedule.from_config("linear", 1000, 1e-4, 0.02, zero_terminal_snr)


@pytest.mark.parametrize(
    ("student", "teacher_pred", "ztsnr"),
    [("v", "v", True), ("x0", "v", True), ("v", "eps", False), ("x0", "x0", False)],
)
def test_target_makes_one_student_step_equal_two_teacher_steps(student, teacher_pred, ztsnr):
    """A student that outputs the Algorithm 2 target at every step: its N-step DDIM sample (the project's
    sampler) equals the teacher's 2N-step DDIM sample to float64 precision, from the same pure noise."""
    schedule = _schedule(ztsnr)
    teacher = distill.Teacher(ToyNet(), DDPMObjective(schedule, teacher_pred), rank=0)
    student_obj = DDPMObjective(schedule, student)
    n_student = 4
    grids = distill.nested_grids(schedule, n_student, 2 * n_student)

    def student_fn(x, t_model):
        i = (grids[0].timesteps == int(t_model[0])).nonzero().flatten().expand(x.shape[0])
        t, _, ab_t, ab_s = distill.step_coefficients(grids[0], i, x)
        z_s = teacher.ddim(x, {}, grids[1], start=2 * i, n=2)
        x_tilde = distill.x0_target(x, z_s, ab_t, ab_s)
        if student == "x0":
            return x_tilde
        return (ab_t.sqrt() * x - x_tilde) / (1 - ab_t).sqrt()  # v such that x0_hat = x_tilde

    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one = student_obj.sample(student_fn, x_T, n_student)
    two = teacher.objective.sample(lambda x, t: teacher.backbone(x, t), x_T, 2 * n_student)
    assert (
        two - teacher.objective.sample(lambda x, t: teacher.backbone(x, t), x_T, n_student)
    ).abs().max() > 1e-2
    torch.testing.assert_close(one, two, rtol=0, atol=1e-10)


def test_progressive_loss_is_zero_for_the_target_and_weights_follow_the_paper():
    """Salimans & Ho sec. 4: 'SNR+1' weighting on x0 errors is exactly the unweighted loss on v; 'truncated
    SNR' is max(SNR, 1); the weights stay finite at alpha_bar = 0 (zero terminal SNR)."""
    torch.manual_seed(0)
    z_t, x0_hat, x0_tilde = (torch.randn(5, 3, 4, 4, dtype=torch.float64) for _ in range(3))
    ab = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64).reshape(-1, 1, 1, 1)
    v = [(ab.sqrt() * z_t - x) / (1 - ab).sqrt() for x in (x0_hat, x0_tilde)]  # x0 = a z - s v
    torch.testing.assert_close(
        distill.distill_loss(x0_hat, x0_tilde, ab, "snr_plus_one"), (v[0] - v[1]).square().mean()
    )
    w = distill.loss_weight(ab, "truncated_snr").flatten()
    torch.testing.assert_close(w, torch.maximum(ab / (1 - ab), torch.ones_like(ab)).flatten())
    assert w[0] == 1 and distill.distill_loss(x0_tilde, x0_tilde, ab, "truncated_snr") == 0
    with pytest.raises(ValueError, match="distill.weighting"):
        distill.loss_weight(ab, "snr")


def test_rounds_halve_the_steps_on_nested_trailing_grids():
    assert distill.num_rounds(32, 4) == 3 and distill.num_rounds(8, 4) == 1
    with pytest.raises(ValueError, match="power of two"):
        distill.num_rounds(24, 4)
    assert [distill.round_of(s, 50, 3) for s in (0, 49, 50, 149, 150)] == [0, 0, 1, 2, 2]
    assert [distill.round_teacher_steps(32, r) for r in range(3)] == [32, 16, 8]
    student, teacher = distill.nested_grids(_schedule(True), 4, 32)
    assert student.timesteps.tolist() == [999, 749, 499, 249] and teacher.timesteps[0] == 999
    assert student.alpha_bar[0] == 0 and student.alpha_bar[-1] == 1  # pure noise -> clean estimate
    assert student.end_timesteps().tolist() == [749, 499, 249, 0]


def test_first_student_step_starts_from_pure_noise():
    """Lin et al. 2024: without zero terminal SNR, q(z_T|x) leaks signal; the student's first step is
    trained on pure noise, as sampling starts; other steps use q(z_t|x)."""
    obj = DDPMObjective(_schedule(False), "v")
    x0, noise = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    t = torch.tensor([999, 500])
    z = distill.student_input(obj, x0, noise, t, first=torch.tensor([True, False]))
    assert z[0].abs().max() == 0 and z[1].min() > 0


# -- the discriminator -----------------------------------------------------------------------------------
def _backbone(name: str):
    torch.manual_seed(0)
    text = name != "dit_debug"
    return build_backbone(
        ModelConfig(name=name, num_classes=None if text else 4), in_channels=4, sample_size=16,
        cond_dim=24 if text else None,
    )  # fmt: skip


def _cond(name: str, batch: int) -> dict:
    if name == "dit_debug":
        return {"class_labels": torch.tensor([0, 3, 4])[:batch]}
    cond = {
        "encoder_hidden_states": torch.randn(batch, 5, 24),
        "encoder_attention_mask": torch.ones(batch, 5),
    }
    cond["encoder_attention_mask"][0, 3:] = 0
    if name == "unet_sdxl_debug":
        cond.update(pooled=torch.randn(batch, 24), time_ids=torch.rand(batch, 6) * 16)
    return cond


def _encoder_pairs(disc: Discriminator, teacher) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(copy, original) parameter pairs of the discriminator's encoder and the teacher's network."""
    source = dict(teacher.net.named_parameters())
    pairs = []
    for name, p in disc.encoder.named_parameters():
        key = name.removeprefix("unet.").replace("blocks.", "transformer_blocks.", 1)
        key = key if key in source else name.removeprefix("unet.")
        pairs.append((p, source[key]))
    return pairs


@pytest.mark.parametrize("name", ["pixart_debug", "dit_debug", "unet_debug", "unet_sdxl_debug"])
def test_discriminator_is_a_trainable_copy_of_the_frozen_teachers_encoder(name):
    teacher = _backbone(name).requires_grad_(False)
    disc = Discriminator.from_teacher(teacher)
    pairs = _encoder_pairs(disc, teacher)
    assert len(pairs) == len(list(disc.encoder.parameters())) > 4
    assert all(torch.equal(c, o) and c.data_ptr() != o.data_ptr() and c.requires_grad for c, o in pairs)
    if name in ("dit_debug", "pixart_debug"):  # the first half of the transformer blocks
        assert len(disc.encoder.blocks) == len(teacher.net.transformer_blocks) // 2
    else:  # conv_in + embeddings + down blocks + mid block; no decoder
        assert disc.encoder.unet.up_blocks is None and disc.encoder.unet.conv_out is None

    x_t, x_s = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    t, s = torch.tensor([999.0, 500.0, 249.0]), torch.tensor([749.0, 249.0, 0.0])
    p = disc.probability(x_t, x_s, t, s, **_cond(name, 3))
    assert p.shape == (3,) and bool(((p > 0) & (p < 1)).all())

    before = [o.clone() for _, o in pairs]
    opt = torch.optim.SGD(disc.parameters(), lr=1.0)
    discriminator_loss(
        disc(x_t, x_s, t, s, **_cond(name, 3)), disc(x_t, x_t, t, s, **_cond(name, 3))
    ).backward()
    assert all(c.grad is not None for c, _ in pairs) and all(o.grad is None for _, o in pairs)
    opt.step()
    assert any(not torch.equal(c, o) for c, o in pairs)  # the copy trains ...
    assert all(torch.equal(o, b) for (_, o), b in zip(pairs, before))  # ... the teacher does not


def test_discriminator_sees_x_t_and_the_condition():
    """D(x_t, x_s, t, s, c) depends on x_t (it judges the transition) and on c, not only on x_s."""
    disc = Discriminator.from_teacher(_backbone("pixart_debug")).eval()
    x_t, x_s, t, s = (
        torch.randn(2, 4, 16, 16),
        torch.randn(2, 4, 16, 16),
        torch.tensor([999.0] * 2),
        torch.zeros(2),
    )
    cond = _cond("pixart_debug", 2)
    base = disc(x_t, x_s, t, s, **cond)
    assert not torch.allclose(base, disc(torch.randn_like(x_t), x_s, t, s, **cond))
    other = dict(cond, encoder_hidden_states=torch.randn_like(cond["encoder_hidden_states"]))
    assert not torch.allclose(base, disc(x_t, x_s, t, s, **other))


def test_gan_losses_are_the_papers():
    """L_D = -log p - log(1 - p_hat), L_G = -log p_hat (Lin et al. 2024 sec. 3), computed from logits."""
    real, fake = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([-0.5, 1.5, 0.0])
    p, p_hat = torch.sigmoid(real), torch.sigmoid(fake)
    torch.testing.assert_close(discriminator_loss(real, fake), (-p.log() - (1 - p_hat).log()).mean())
    torch.testing.assert_close(generator_loss(fake), (-p_hat.log()).mean())
    assert discriminator_loss(torch.tensor([50.0]), torch.tensor([-50.0])) < 1e-20  # finite at saturation


@pytest.mark.parametrize("name", ["unet_sdxl_debug", "dit_debug"])
def test_transition_losses_train_unet_and_dit_students_on_latents(name):
    """The shared per-batch math on 4-channel latents: Algorithm 2's loss and the generator's L_G both
    reach the student, the teacher and the frozen discriminator get no gradient."""
    teacher = distill.Teacher(_backbone(name), DDPMObjective(_schedule(True), "v"), rank=0)
    student = _backbone(name)
    disc = Discriminator.from_teacher(teacher.backbone)
    obj = DDPMObjective(teacher.objective.schedule, "x0")
    grids = distill.nested_grids(obj.schedule, 2, 8)
    cond = _cond(name, 3)
    tr = distill.student_transition(student, teacher, obj, torch.randn(3, 4, 16, 16), cond, grids, n=4)
    with distill.frozen(disc):
        logit = disc(tr["z_t"], tr["z_s_hat"], tr["t"].float(), tr["s"].float(), **cond)
    loss = generator_loss(logit) + distill.transition_loss(tr, "snr_plus_one")
    loss.backward()
    assert torch.isfinite(loss) and tr["z_s"].shape == tr["z_s_hat"].shape == (3, 4, 16, 16)
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in [*teacher.backbone.parameters(), *disc.parameters()])
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again after the pass


# -- teacher state, sample grids, recipe checks ------------------------------------------------------------
def test_teacher_checkpoint_round_trip(tmp_path):
    obj = DDPMObjective(_schedule(True), "v")
    teacher = distill.Teacher(_backbone("pixart_debug"), obj, rank=0)
    teacher.save(str(tmp_path / "r0"))
    assert not (tmp_path / "r0" / "teacher.pt").exists()  # round 0 is the distill.teacher folder
    student = _backbone("pixart_debug")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    teacher.become(student, 2, prediction="x0")
    teacher.save(str(tmp_path / "r2"))
    fresh = distill.Teacher(_backbone("pixart_debug"), DDPMObjective(obj.schedule, "v"), rank=1)
    assert fresh.fingerprint() != teacher.fingerprint()
    fresh.load(str(tmp_path / "r2"))
    assert fresh.round == 2 and fresh.objective.prediction == "x0"
    assert fresh.fingerprint() == teacher.fingerprint()
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.backbone.state_dict().values(), student.state_dict().values())
    )
    assert not any(p.requires_grad for p in fresh.backbone.parameters())


def test_teacher_must_have_the_students_architecture(tmp_path):
    _backbone("dit_debug").net.save_pretrained(tmp_path / "teacher")  # 4 classes
    overrides = ["model.name=dit_debug", "model.num_classes=12", "sample.classes=[0]"]
    recipe, _ = load_recipe(
        "distill/progressive_pixart_debug", [*overrides, f"distill.teacher={tmp_path}/teacher"]
    )
    student = build_backbone(recipe.model, in_channels=4, sample_size=16)
    with pytest.raises(ValueError, match="distill.teacher=.*does not have the student's architecture"):
        distill.Teacher.from_recipe(recipe, student, DDPMObjective(_schedule(True), "v"), 0, "cpu")


def test_sample_grids_use_the_student_step_count(monkeypatch):
    seen = []
    monkeypatch.setattr(
        distill.Harness, "sample_grid", lambda self, step, engine, ema, steps=None: seen.append(steps)
    )
    h = object.__new__(distill.DistillHarness)
    h.sample_steps = 4
    h.sample_grid(10, None, None)
    h.sample_grid(10, None, None, steps=2)
    assert seen == [4, 2]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["distill.teacher=null"], "distill.teacher"),
        (["objective.kind=flow"], "objective.kind"),
        (["objective.kind=eps", "objective.zero_terminal_snr=false"], "objective.kind"),
        (["distill.teacher_steps=24"], "distill.teacher_steps"),
        (["train.max_steps=151"], "train.max_steps"),
        (["sample.sampler=ddpm"], "sample.sampler"),
        (["distill.teacher_prediction=eps"], "distill.teacher_prediction"),
        (["distill.weighting=snr"], "distill.weighting"),
        (["distill.steps_per_round=0"], "distill.steps_per_round"),
    ],
)  # fmt: skip
def test_progressive_recipe_mistakes_name_the_key(overrides, key):
    with pytest.raises(RecipeError) as err:
        load_recipe("distill/progressive_pixart_debug", overrides)
    assert f"'{key}'" in str(err.value) and "progressive_pixart_debug.yaml" in str(err.value)


def test_adversarial_recipe_mistakes_name_the_key():
    for overrides, key in [
        (["distill.teacher_steps=18"], "distill.teacher_steps"),
        (["distill.disc_lr=0"], "distill.disc_lr"),
        (["distill.mse_weight=-1"], "distill.mse_weight"),
    ]:
        with pytest.raises(RecipeError, match=f"'{key}'"):
            load_recipe("distill/adversarial_pixart_debug", overrides)
    recipe, _ = load_recipe(
        "distill/adversarial_pixart_debug", ["distill.teacher_steps=12", "train.max_steps=7"]
    )
    assert recipe.distill.teacher_steps == 12  # no round structure: any multiple of student_steps


# -- end to end under Ray (slow) ---------------------------------------------------------------------------
def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def _launch(kind: str, name: str, tmp_path, toy_cache, teacher, *overrides):
    from nuance.orchestration.launch import train

    recipe = debug_recipe(
        kind,
        f"name={name}",
        f"cluster.storage_path={tmp_path}",
        f"data.cache_dir={toy_cache}",
        f"distill.teacher={teacher}",
        "data.batch_size=8",  # x 2 workers: global batch 16
        "tracking.mode=offline",
        "sample.num_per_condition=1",
        *DISTILL_OVERRIDES,
        *overrides,
    )
    result = train(recipe)
    assert result.error is None, result.error
    return recipe


@torch.no_grad()
def sample_scores(teacher_dir: Path, checkpoint: Path, student_steps: int) -> dict[str, float]:
    """The teacher at student_steps and the student at student_steps (DDIM, same initial noise and prompts,
    no CFG): MSE (images in [0, 1]) to the teacher's 32-step samples, and KID to the data."""
    from nuance.trainers.inference import load_checkpoint_model
    from nuance.trainers.sampling import generate

    recipe, comps = load_checkpoint_model(checkpoint, use_ema=False)
    teacher_model = ModelConfig(name=recipe.model.name, pretrained=str(teacher_dir))
    size, width = recipe.data.image_size, comps.text_encoder.hidden_size
    teacher = build_backbone(teacher_model, in_channels=3, sample_size=size, cond_dim=width).eval()
    teacher_obj = DDPMObjective(comps.objective.schedule, recipe.distill.teacher_prediction or "v")

    def images(model, objective, steps):
        return generate(
            model, objective, comps.conditioner, comps.autoencoder, prompts=EVAL_PROMPTS, classes=[],
            num_per_condition=EVAL_PER_PROMPT, latent_shape=comps.latent_shape, steps=steps, cfg=1.0,
            seed=7,
        )[0]  # fmt: skip

    reference = images(teacher, teacher_obj, 32)
    teacher_few = images(teacher, teacher_obj, student_steps)
    student_few = images(comps.backbone, comps.objective, student_steps)
    evaluator = Evaluator.for_data(recipe.data)  # nuance's quality metric on the run's toy data
    return {
        f"teacher_{student_steps}": float((teacher_few - reference).square().mean()),
        f"student_{student_steps}": float((student_few - reference).square().mean()),
        f"kid_teacher_{student_steps}": evaluator.kid_to(teacher_few, num_subsets=KID_SUBSETS),
        f"kid_student_{student_steps}": evaluator.kid_to(student_few, num_subsets=KID_SUBSETS),
        "kid_teacher_32": evaluator.kid_to(reference, num_subsets=KID_SUBSETS),
    }


def assert_student_beats_the_teachers_4_steps(scores: dict[str, float]) -> None:
    """Closer than the teacher's own 4 steps to its 32-step samples (MSE) and to the data (KID)."""
    assert scores["student_4"] < 0.5 * scores["teacher_4"], scores
    # the metric sees what 4 steps cost the teacher, and the student wins it back
    assert scores["kid_teacher_32"] < scores["kid_teacher_4"] - KID_MARGIN, scores
    assert scores["kid_student_4"] < scores["kid_teacher_4"] - KID_MARGIN, scores


def _fingerprint(folder: Path) -> float:
    from diffusers import PixArtTransformer2DModel

    net = PixArtTransformer2DModel.from_pretrained(folder)
    return distill.Teacher(nn.Sequential(net), None, rank=0).fingerprint()


@pytest.mark.slow
def test_progressive_32_to_4_resumes_and_beats_the_teachers_4_steps(
    tmp_path, toy_cache, distill_teacher, ray_cluster
):
    common = (
        "progressive",
        "pd",
        tmp_path,
        toy_cache,
        distill_teacher,
        "train.ckpt_every=25",
        "train.log_every=5",
    )
    _launch(*common, "train.max_steps=75")  # stops in the middle of round 1
    _launch(*common)  # the same name again: resumes at step 75 and runs to 150
    run = tmp_path / "pd"
    starts = [
        json.loads(line)["resume_from"]
        for line in (run / "workers" / "rank00000.jsonl").read_text().splitlines()
    ]
    assert starts[0] is None and starts[1] is not None
    m = _metrics(run)
    assert [m[s]["distill/round"] for s in (5, 50, 55, 75, 80, 100, 105, 150)] == [0, 0, 1, 1, 1, 1, 2, 2]
    assert [m[s]["distill/student_steps"] for s in (50, 55, 105)] == [16, 8, 4]
    fp = {s: m[s]["distill/teacher_fingerprint"] for s in (5, 50, 55, 75, 80, 100, 105, 150)}
    assert fp[5] == fp[50] == pytest.approx(_fingerprint(distill_teacher), rel=1e-12)  # round 0: the folder
    assert fp[55] == fp[75] == fp[80] == fp[100]  # round 1's teacher, restored exactly by the resume at 75
    assert fp[105] == fp[150] and len({fp[5], fp[55], fp[105]}) == 3  # each round: a new teacher
    info = json.loads((run / "step_00000150" / "deepspeed_teacher" / "teacher.json").read_text())
    assert info == {"round": 2, "prediction": "v", "weights": True}  # the round's teacher is checkpointed
    assert (run / "samples" / "step_00000150.png").is_file()

    scores = sample_scores(distill_teacher, run / "step_00000150", 4)
    print(f"\nteacher: {(distill_teacher / 'train_log.txt').read_text().strip()}")
    print(f"progressive 32->16->8->4, MSE to the teacher's 32-step samples and KID to the data: {scores}")
    assert_student_beats_the_teachers_4_steps(scores)


@pytest.mark.slow
def test_adversarial_4_step_student_resumes_and_beats_the_teachers_4_steps(
    tmp_path, toy_cache, distill_teacher, ray_cluster
):
    # ZeRO-3 here (progressive above runs ZeRO-2): two partitioned engines, D frozen in the generator pass.
    common = (
        "adversarial",
        "ad",
        tmp_path,
        toy_cache,
        distill_teacher,
        "train.ckpt_every=25",
        "train.log_every=5",
    )
    _launch(*common, "engine.zero_stage=3", "train.max_steps=50")
    _launch(*common, "engine.zero_stage=3")  # resumes at step 50 and runs to 100
    run = tmp_path / "ad"
    starts = [
        json.loads(line)["resume_from"]
        for line in (run / "workers" / "rank00000.jsonl").read_text().splitlines()
    ]
    assert starts[0] is None and starts[1] is not None
    m = _metrics(run)
    assert set(m) >= {5, 50, 55, 100}
    for row in m.values():
        assert (
            0 < row["distill/p_real"] < 1
            and 0 < row["distill/p_fake"] < 1
            and math.isfinite(row["distill/mse"])
        )
    last = run / "step_00000100"
    assert (last / "deepspeed_discriminator" / "state").is_dir()  # the second engine is checkpointed

    from nuance.trainers.inference import sample_from_checkpoint  # what `nuance sample CKPT --steps 4` runs

    assert len(sample_from_checkpoint(last, prompts=["a red circle"], classes=[], steps=4, cfg=1.0,
                                      num_per_condition=2, out=tmp_path / "png")) == 2  # fmt: skip
    scores = sample_scores(distill_teacher, last, 4)
    d = {k: round(m[100][f"distill/{k}"], 4) for k in ("d_loss", "p_real", "p_fake", "mse")}
    print(f"\nadversarial 16->4 (+ MSE term), MSE to the teacher's 32 steps and KID: {scores}; step 100: {d}")
    assert_student_beats_the_teachers_4_steps(scores)
