"""Every knob of the engine: frozen dataclasses with documented, validated defaults.

``flows/config.py`` builds these from params.yaml; unknown keys are rejected there.
Defaults follow the MEMIT/AlphaEdit/NAS papers unless a comment says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nas_core.prompts import DEFAULT_CONTEXT_PREFIXES


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


#: Values of ``ValueSettings.compute_dtype``.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
ATTENTION_KERNELS = ("default", "math")


@dataclass(frozen=True)
class ValueSettings:
    """The v* optimisation (MEMIT's ``compute_z``), shared by every editor.

    Attributes:
        steps: maximum Adam steps per request.
        lr: Adam learning rate on the residual shift delta.
        kl_factor: weight of KL(current || initial) on ``kl_prompt`` (keeps the subject's
            other attributes).
        weight_decay: weight of ||delta|| / ||h||^2.
        clamp_norm_factor: ||delta|| is clamped to this times ||h|| after every step.
        early_stop_nll: a request stops optimising once its mean target NLL is below this.
        kl_prompt: template for the KL anchor prompt.
        prefixes: context prefixes; the first must be "" (the bare prompt). Keys use the
            same list, so key and value agree (prefix-consistent editing).
        compute_dtype: what the frozen blocks above the edit layer (and the head) compute
            in during the optimisation of float32 weights: ``"float32"``, or ``"bfloat16"``
            (where the hardware computes it natively: AMX / AVX512-BF16 CPUs, CUDA); the
            shift, the loss and Adam stay float32. ``"auto"`` is a config value that the
            caller resolves to one of the two before editing (``flows.engine.precision``), and the
            resolved path is recorded with every edit so that a replay takes the same one.
        attention: the scaled-dot-product attention kernel of the optimisation's steps:
            ``"default"`` (PyTorch's choice: flash attention on CPU) or ``"math"`` (explicit
            products and softmax), whose backward is much cheaper for the few query columns
            of a v* tail on CPU (docs/speed.md). Part of the recorded path like
            ``compute_dtype``: nights recorded without it replay on ``"default"``.
        tail_group_slack: requests are optimised in one batch per tail width (the columns
            right of the subject); widths at most this many columns above a group's narrowest
            join that group, padded. 0 keeps one batch per width. A wider batch pays for its
            padding on every step but saves a pass per group: it wins at small batches and
            loses at large ones (docs/speed.md). Requests stay independent; only the last bits
            of the results move with the batch's shape.
    """

    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    early_stop_nll: float = 0.05
    kl_prompt: str = "{} is a"
    prefixes: tuple[str, ...] = DEFAULT_CONTEXT_PREFIXES
    compute_dtype: str = "float32"
    attention: str = "default"
    tail_group_slack: int = 0

    def __post_init__(self) -> None:
        _check(self.tail_group_slack >= 0, "values.tail_group_slack must be >= 0")
        _check(self.compute_dtype in COMPUTE_DTYPES, f"values.compute_dtype must be one of {COMPUTE_DTYPES}")
        _check(self.attention in ATTENTION_KERNELS, f"values.attention must be one of {ATTENTION_KERNELS}")
        _check(self.steps >= 1, "values.steps must be >= 1")
        _check(self.lr > 0, "values.lr must be > 0")
        _check(self.kl_factor >= 0, "values.kl_factor must be >= 0")
        _check(self.weight_decay >= 0, "values.weight_decay must be >= 0")
        _check(self.clamp_norm_factor > 0, "values.clamp_norm_factor must be > 0")
        _check(self.early_stop_nll >= 0, "values.early_stop_nll must be >= 0")
        _check(self.kl_prompt.count("{}") == 1, "values.kl_prompt needs exactly one '{}'")
        _check(bool(self.prefixes) and self.prefixes[0] == "", "values.prefixes must start with ''")


@dataclass(frozen=True)
class NASSettings:
    """Norm-Anchor Scaling (arXiv 2602.02543).

    Attributes:
        enabled: rescale every v* to the reference norm a.
        outlier_factor: a v* with ||v*|| > outlier_factor * a is an outlier.
        outlier_policy: "skip" drops the request (reported); "clip" keeps it, rescaled to a
            like every other v*, and flags it.
        pilots: number of pilot requests for calibrating a on the unedited model.
        drop_top_fraction: share of the largest pilot norms dropped before averaging.
        seed: seed of the pilot sample.
        pilot_batch_size: pilots optimised together in one batched forward/backward.
    """

    enabled: bool = True
    outlier_factor: float = 2.0
    outlier_policy: str = "skip"
    pilots: int = 1000
    drop_top_fraction: float = 0.05
    seed: int = 0
    pilot_batch_size: int = 25

    def __post_init__(self) -> None:
        _check(self.outlier_factor > 1, "nas.outlier_factor must be > 1")
        _check(self.outlier_policy in ("skip", "clip"), "nas.outlier_policy must be 'skip' or 'clip'")
        _check(self.pilots >= 1, "nas.pilots must be >= 1")
        _check(0 <= self.drop_top_fraction < 1, "nas.drop_top_fraction must be in [0, 1)")
        _check(self.pilot_batch_size >= 1, "nas.pilot_batch_size must be >= 1")


def _check_layers(layers: tuple[int, ...], what: str) -> None:
    _check(len(layers) >= 1, f"{what}.layers must not be empty")
    _check(all(x >= 0 for x in layers), f"{what}.layers must be >= 0")
    _check(list(layers) == sorted(set(layers)), f"{what}.layers must be strictly increasing")


@dataclass(frozen=True)
class MemitSettings:
    """MEMIT (arXiv 2210.07229) in sequential mode.

    Attributes:
        layers: edited layers l_1 < ... < l_T; v* is optimised after l_T.
        mom2_weight: lambda, the weight of the preserved-key covariance C in the solve.
        use_key_cache: add S = sum of past K K^T to the solve (sequential editing).
    """

    layers: tuple[int, ...] = (3, 4, 5, 6, 7)
    mom2_weight: float = 15000.0
    use_key_cache: bool = True
    nas: NASSettings = field(default_factory=NASSettings)
    values: ValueSettings = field(default_factory=ValueSettings)

    def __post_init__(self) -> None:
        _check_layers(self.layers, "memit")
        _check(self.mom2_weight > 0, "memit.mom2_weight must be > 0")


@dataclass(frozen=True)
class AlphaEditSettings:
    """AlphaEdit (arXiv 2410.02355): null-space projected MEMIT.

    Attributes:
        layers: edited layers.
        nullspace_threshold: eigenvalues of C below this span the null space P projects on.
        nullspace_relative_threshold: when set, the cut is this fraction of C's largest
            eigenvalue instead (scale-free: the right choice for models whose key scale
            differs from the ones AlphaEdit's absolute 1e-2 was tuned on).
        l2: beta, the ridge on the projected solve.
    """

    layers: tuple[int, ...] = (3, 4, 5, 6, 7)
    nullspace_threshold: float = 0.02
    nullspace_relative_threshold: float | None = None
    l2: float = 10.0
    nas: NASSettings = field(default_factory=NASSettings)
    values: ValueSettings = field(default_factory=ValueSettings)

    def __post_init__(self) -> None:
        _check_layers(self.layers, "alphaedit")
        _check(self.nullspace_threshold > 0, "alphaedit.nullspace_threshold must be > 0")
        _check(self.nullspace_relative_threshold is None or 0 < self.nullspace_relative_threshold < 1,
               "alphaedit.nullspace_relative_threshold must be in (0, 1)")
        _check(self.l2 > 0, "alphaedit.l2 must be > 0")


@dataclass(frozen=True)
class RomeSettings:
    """r-ROME (arXiv 2403.07175): rank-one update of one layer with consistent keys.

    Attributes:
        layers: exactly one edited layer.
        cov_jitter: ridge added to C (relative to its mean diagonal) before C^-1 k, so a
            rank-deficient C from a small corpus stays invertible.
        prefix_consistent: True (r-ROME) uses the prefix-averaged key k* everywhere; False
            is classic ROME, whose residual and denominator use the unprefixed key k:
            Delta = (v* - W k)(C^-1 k*)^T / (k^T C^-1 k*), which blows up when k and k*
            differ (a subject that is the prompt's first token). A baseline, never a default.
    """

    layers: tuple[int, ...] = (5,)
    cov_jitter: float = 1e-4
    prefix_consistent: bool = True
    nas: NASSettings = field(default_factory=NASSettings)
    values: ValueSettings = field(default_factory=ValueSettings)

    def __post_init__(self) -> None:
        _check_layers(self.layers, "rome")
        _check(len(self.layers) == 1, "rome edits exactly one layer")
        _check(self.cov_jitter >= 0, "rome.cov_jitter must be >= 0")


EditorSettings = MemitSettings | AlphaEditSettings | RomeSettings


@dataclass(frozen=True)
class StatsSettings:
    """Covariance statistics C.

    Attributes:
        corpus: "wikitext" (../shared WikiText-2 test text), a path to a text file, a
            datasets spec "dataset:NAME[:CONFIG]:SPLIT:COLUMN", or "self" (data-free: text
            the model samples itself).
        tokens: tokens to average over.
        seq_len: tokens per sequence.
        batch_size: sequences per forward pass.
        seed: seed for the data-free sampler.
    """

    corpus: str = "wikitext"
    tokens: int = 250_000
    seq_len: int = 256
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        _check(bool(self.corpus), "stats.corpus must not be empty")
        _check(self.tokens >= 1, "stats.tokens must be >= 1")
        _check(self.seq_len >= 2, "stats.seq_len must be >= 2")
        _check(self.batch_size >= 1, "stats.batch_size must be >= 1")


@dataclass(frozen=True)
class EvalSettings:
    """What the health evaluation runs (params.yaml ``eval``).

    Attributes:
        general_tasks: zero-shot tasks from ../shared/data/general (skipped where absent).
        general_items: items per task, the first N of each file (the files are already
            random subsets, so the first N are a fixed, unbiased sample).
        canary_tokens: tokens of the canary text scored for perplexity.
        canary_window: tokens per perplexity window.
        fluency_prompts: at most this many generation prompts (from the requests).
        fluency_new_tokens: greedy tokens generated per fluency prompt.
        batch_size: at most this many rows per scoring forward pass.
        batch_tokens: at most this many padded tokens (rows x longest row) per scoring
            forward pass; rows are batched by length. Bounds the activations of a pass
            (the MLP's rows x d_ff products) whatever the prompts' lengths.
    """

    general_tasks: tuple[str, ...] = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")
    general_items: int = 100
    canary_tokens: int = 4096
    canary_window: int = 256
    fluency_prompts: int = 10
    fluency_new_tokens: int = 40
    batch_size: int = 32
    batch_tokens: int = 4096

    def __post_init__(self) -> None:
        _check(self.batch_tokens >= 1, "eval.batch_tokens must be >= 1")
        if self.general_items < 0 or self.canary_tokens < 2 or self.canary_window < 2:
            raise ValueError("eval: general_items >= 0, canary_tokens >= 2 and canary_window >= 2 are required")
        if self.fluency_prompts < 0 or self.fluency_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("eval: fluency_prompts >= 0, fluency_new_tokens >= 1, batch_size >= 1 are required")


@dataclass(frozen=True)
class TraceSettings:
    """Causal tracing of MLP states (``nas bench trace``), ROME's layer-location method.

    Attributes:
        samples: noise draws per request; every layer is restored under the same draws.
        noise_factor: noise standard deviation as a multiple of the subject embeddings'
            (ROME uses 3).
        window: MLP outputs of this many consecutive layers, centred on the traced layer,
            are restored together (ROME uses 10 of GPT-2 XL's 48 layers; one layer alone
            carries too little of the effect in a small model to stand above the noise).
        seed: seed of the noise.
    """

    samples: int = 5
    noise_factor: float = 3.0
    window: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.samples >= 1, "trace.samples must be >= 1")
        _check(self.noise_factor > 0, "trace.noise_factor must be > 0")
        _check(self.window >= 1, "trace.window must be >= 1")
