"""Config keys added by ElixirNet on top of detectron2's defaults, and the config loader."""

import os
from typing import Any, List, Sequence, Tuple

import yaml

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["add_elixirnet_config", "load_config"]


def load_config(config_file: str, opts: Sequence = ()) -> CN:
    """detectron2's defaults + the ElixirNet keys + ``config_file`` + ``opts`` (KEY VALUE ...),
    not frozen. Safe YAML only: detectron2 would otherwise fall back to ``yaml.unsafe_load``,
    which runs code from the file. A missing or unreadable file, YAML that is not plain data, an
    unknown key (the closest known key suggested) or a value of the wrong type raise
    :class:`elixir_d2.cli.UserInputError` naming the file or the key."""
    from .cli import (
        MissingFileError,
        UnknownKeyError,
        UserInputError,
        did_you_mean,
        one_line,
        require_file,
    )

    if not config_file:
        raise MissingFileError(
            "no config file given: pass --config-file FILE (configs/ holds "
            "them, e.g. configs/quickstart/fpn.yaml)"
        )
    require_file(
        config_file, "config file", "pass --config-file with an existing YAML file (see configs/)"
    )
    cfg = get_cfg()
    add_elixirnet_config(cfg)
    _check_config_shape(config_file, cfg, config_file, ())
    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except KeyError as e:
        key = _key_from(e)
        raise UnknownKeyError(
            f"{config_file}: unknown config key {key}{did_you_mean(key, _all_keys(cfg))}"
        ) from e
    except yaml.YAMLError as e:
        raise UserInputError(f"{config_file}: not a plain-data YAML config ({one_line(e)})") from e
    except (OSError, UnicodeDecodeError) as e:  # a _BASE_ that is missing, a binary file
        raise MissingFileError(f"{config_file}: cannot be read ({one_line(e)})") from e
    except (ValueError, AssertionError) as e:  # yacs: type mismatch, a key that cannot be merged
        raise UserInputError(f"{config_file}: {one_line(e)}") from e
    except (TypeError, AttributeError) as e:  # a shape _check_config_shape did not foresee
        raise UserInputError(f"{config_file}: not a valid config ({one_line(e)})") from e
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError) as e:
        if "Non-existent" not in str(e):  # an odd number of KEY VALUE items
            raise UserInputError(
                f"config overrides must be KEY VALUE pairs, got {list(opts)}"
            ) from e
        key = _key_from(e)
        raise UnknownKeyError(
            f"command-line override {key}: unknown config key{did_you_mean(key, _all_keys(cfg))}"
        ) from e
    except ValueError as e:
        raise UserInputError(f"command-line override: {one_line(e)}") from e
    return cfg


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"true / false ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):  # not echoed: it may be any file a _BASE_ named
        return "plain text (no KEY: value lines)"
    return f"a {type(value).__name__}"


def _check_config_shape(path: str, cfg: CN, top: str, seen: Tuple[str, ...]) -> None:
    """Raise :class:`elixir_d2.cli.UserInputError` naming the file when the YAML at ``path`` (or a
    ``_BASE_`` it names, followed as detectron2 follows it) is not a mapping, or maps a config
    group (MODEL, SOLVER ...) to something that is not a mapping: yacs would fail on either with
    a bare TypeError. Files that cannot be read or parsed are left to ``merge_from_file``, whose
    errors are already reported by :func:`load_config`."""
    from .cli import UserInputError

    where = path if path == top else f"{top}: _BASE_ {path}"
    real = os.path.realpath(path)
    if real in seen:
        raise UserInputError(f"{top}: _BASE_ loop: {path} includes itself through its _BASE_ chain")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    if data is None:
        raise UserInputError(
            f"{where}: empty config file; expected a mapping of config keys (e.g. MODEL: ...)"
        )
    if not isinstance(data, dict):
        raise UserInputError(
            f"{where}: expected a mapping of config keys, got {_kind(data)} (a "
            "config holds KEY: value lines, e.g. MODEL: ...)"
        )
    base = data.get("_BASE_")
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        if not bases or not all(isinstance(b, str) and b for b in bases):
            raise UserInputError(
                f"{where}: _BASE_ must be a file name or a list of them, got {_kind(base)}"
            )
        for b in bases:
            b = os.path.expanduser(b)
            if b.startswith(("https://", "http://")):
                continue
            if not b.startswith("/"):  # relative to the including file, as detectron2 resolves it
                b = os.path.join(os.path.dirname(path), b)
            _check_config_shape(b, cfg, top, seen + (real,))
    _check_groups(where, data, cfg, "")


def _check_groups(where: str, data: dict, node: CN, prefix: str) -> None:
    from .cli import UserInputError

    for k, v in data.items():
        if not isinstance(k, str):
            raise UserInputError(f"{where}: config keys are names, got {_kind(k)} as a key")
        if k == "_BASE_" or k not in node or not isinstance(node[k], CN):
            continue  # unknown keys and values of the wrong type: yacs names them
        if not isinstance(v, dict):
            raise UserInputError(
                f"{where}: {prefix}{k} must be a mapping of config keys, got {v!r}"[:300]
            )
        _check_groups(where, v, node[k], f"{prefix}{k}.")


def _key_from(e: BaseException) -> str:
    # yacs: "Non-existent config key: A.B" (file) / "Non-existent key: A.B" (overrides)
    return str(e.args[0] if e.args else e).rsplit(":", 1)[-1].strip().strip("'")


def _all_keys(cfg: CN, prefix: str = "") -> List[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys += _all_keys(v, full + ".") if isinstance(v, CN) else [full]
    return keys


def add_elixirnet_config(cfg: CN) -> None:
    """Add every ElixirNet key to ``cfg`` in place (call before ``merge_from_file``)."""
    _C = cfg

    # ------------------------------------------ CT input (docs/design.md, Data conventions)
    # Slices stacked as channels: 3 (key -d, key, key +d) or 9 (key +- d, 2d, 3d, 4d).
    _C.INPUT.NUM_SLICES = 3
    # Distance d between stacked slices, in mm; neighbours are interpolated linearly between the
    # two nearest real slices when the series' slice interval does not divide d.
    _C.INPUT.SLICE_INTV_MM = 2.0
    # HU window mapped linearly onto [0, 255] (values outside are clipped).
    _C.INPUT.HU_WINDOW = (-1024.0, 3071.0)
    # Pixel spacing (mm) every slice is resampled to; <= 0 keeps the native spacing.
    _C.INPUT.NORM_SPACING_MM = 0.8
    # Cap on the longer image side after spacing normalisation, in pixels.
    _C.INPUT.MAX_IMAGE_SIZE = 512
    # Training-time horizontal flip probability (0 switches it off).
    _C.INPUT.FLIP_PROB = 0.5
    # Training on square crops of the resampled slice (inference always sees whole slices), so
    # a fine pixel spacing stays cheap per iteration. SIZE: side in pixels, 0 = no crop.
    # LESION_PROB: share of crops that hold a whole lesion chosen at random; the rest are
    # uniform over the slice, so background and lesion-free slices are still seen.
    _C.INPUT.LESION_CROP = CN()
    _C.INPUT.LESION_CROP.SIZE = 0
    _C.INPUT.LESION_CROP.LESION_PROB = 0.5
    # Inference on the body only: each test slice is cropped to the box of its body (pixels of
    # the key slice above HU_THRESHOLD, specks left out) grown by MARGIN_MM, at the resampling
    # the whole slice would get, so the air and table around it cost no backbone time.
    # Predictions come back in slice pixels: MODEL.META_ARCHITECTURE BodyCropRCNN (every shipped
    # config) undoes the crop in its postprocess, and the mapper refuses any other.
    _C.INPUT.BODY_CROP = CN()
    _C.INPUT.BODY_CROP.ENABLED = False
    _C.INPUT.BODY_CROP.HU_THRESHOLD = -500.0
    _C.INPUT.BODY_CROP.MARGIN_MM = 10.0

    # -------------------------------------------------------- Deformable backbone (Deformv2)
    # Op behind MODEL.RESNETS.DEFORM_ON_PER_STAGE in build_deformable_resnet{,_fpn}_backbone:
    # "torchvision" (torchvision.ops.deform_conv2d, runs anywhere), "detectron2" (its C++ ops) or
    # "auto" = detectron2's when compiled and MODEL.DEVICE is CUDA, torchvision's otherwise.
    _C.MODEL.RESNETS.DEFORM_IMPL = "auto"
    # Learning-rate factor of the layers that predict the deformable convs' offsets and masks
    # (ElixirTrainer.build_optimizer). Trained from scratch at a high rate, offsets grow to
    # hundreds of pixels within 100 iterations and every sampling point leaves the feature map;
    # the DCN papers give these layers a reduced rate for the same reason.
    _C.SOLVER.DEFORM_OFFSET_LR_FACTOR = 1.0
    # Autocast dtype of SOLVER.AMP.ENABLED: "float16" (detectron2's AMPTrainer, CUDA only) or
    # "bfloat16" (no loss scaling; CUDA or CPU). elixir_d2/amp.py.
    _C.SOLVER.AMP.PRECISION = "float16"

    # Negative slope of the hidden conv's activation in MODEL.RPN.HEAD_NAME "LeakyRPNHead".
    _C.MODEL.RPN.LEAKY_SLOPE = 0.1
    # Normalisation after the hidden conv in MODEL.RPN.HEAD_NAME "NormRPNHead" ("BN", "GN", ...),
    # shared by the feature levels as the conv is, or one per level.
    _C.MODEL.RPN.HEAD_NORM = "BN"
    _C.MODEL.RPN.HEAD_NORM_PER_LEVEL = False

    # ---------------------------------------------------------------- TruncatedRPN (paper eq. 1)
    _C.MODEL.TRPN = CN()
    # Truncation threshold eps on the location confidence p; a negative value means "the mean
    # of p per image and level" (the paper's choice), a value in [0, 1) is used as is.
    _C.MODEL.TRPN.THRESHOLD = -1.0
    # Weight of the auxiliary sigmoid focal loss on p (positives: locations with an anchor
    # matched to a ground truth); 0 switches it off and p learns only through p * I.
    _C.MODEL.TRPN.LOC_LOSS_WEIGHT = 1.0
    _C.MODEL.TRPN.FOCAL_ALPHA = 0.25
    _C.MODEL.TRPN.FOCAL_GAMMA = 2.0
    # Initial p everywhere (the 1x1 conf conv's bias is its logit), RetinaNet's focal-loss prior:
    # from p = 0.5 the focal loss on the mostly negative locations is large and its first steps
    # collapse p; 0.01 starts it small.
    _C.MODEL.TRPN.PRIOR_PROB = 0.01
    # What multiplies the RPN head's input: "max_norm" (p divided by its per-image, per-level
    # maximum), "p" (equation 1 literally) or "none" (truncation only). With "p" the focal loss
    # drives p to ~0 away from lesions and the RPN head, fed ~0, stops learning (measured:
    # no lesion found after 400-500 iterations); see docs/design.md, TruncatedRPN.
    _C.MODEL.TRPN.GATE = "max_norm"
    # Positive locations of the focal loss: "not_background" (an anchor above the RPN's negative
    # IoU threshold, so the ring of locations whose anchors regress onto a lesion is kept) or
    # "foreground" (an anchor matched to a lesion).
    _C.MODEL.TRPN.CONF_POSITIVES = "not_background"

    # ---------------------------------------------------------------- Auto-lesion Block
    _C.MODEL.ALB = CN()
    # Genotype YAML of the fixed ALBHead (written by search_net.py); ignored by ALBSearchHead.
    _C.MODEL.ALB.GENOTYPE = ""
    # The resolved genotype as one line of YAML; train_net / search_net fill it from GENOTYPE so a
    # run's config.yaml names the structure it trained, and predict_net / --eval-only from the
    # checkpoint when GENOTYPE is empty. When both are set they must agree.
    _C.MODEL.ALB.GENOTYPE_YAML = ""
    # Candidate operations: "elixir" (the paper's medical space), "darts" (Table 6 ablation) or a
    # space added with elixir_d2.modeling.alb.register_search_space (docs/extending.md).
    _C.MODEL.ALB.SEARCH_SPACE = "elixir"
    # Branches per block (B) and channels per operation (D; 16 while searching, 32 final).
    _C.MODEL.ALB.BRANCHES = 4
    _C.MODEL.ALB.CHANNELS = 32
    # The 3x3 conv after RoIAlign reduces the RoI feature to this many channels.
    _C.MODEL.ALB.STEM_CHANNELS = 128
    # That stem conv: "sep_conv_3x3" (pointwise 1x1 + depthwise 3x3, the default: a dense 3x3
    # 256->128 on 512 RoIs costs 7.4 GMAC, more than FPN's whole 2-fc head, see ALBStem in
    # elixir_d2/modeling/box_head.py) or "conv_3x3" (the paper's dense conv).
    _C.MODEL.ALB.STEM = "sep_conv_3x3"
    # Apply the sep_conv_3x3 stem's pointwise 1x1 to the whole feature maps before RoIAlign
    # instead of to each pooled RoI. Same values (a bias-free 1x1 conv commutes with RoIAlign's
    # bilinear averaging), but RoIAlign then pools STEM_CHANNELS instead of the FPN's 256
    # channels and the 1x1 runs once per map pixel instead of once per RoI pixel: ~22k pixels of
    # P2-P5 against 49k for 1000 test RoIs of a 512x512 slice. Ignored with the dense stem.
    _C.MODEL.ALB.POINTWISE_BEFORE_POOLING = True
    # Block sequence: "normal" = ALB (keeps size), "reduce" = ALB_r (halves size, doubles D).
    _C.MODEL.ALB.BLOCKS = ["normal", "reduce", "reduce"]
    # Normalisation inside operations: "BN", "GN" or "" (none). GroupNorm normalises each RoI on
    # its own, which erases how strongly a RoI responds, the cue that separates a lesion from
    # faint look-alikes (docs/design.md, Auto-lesion Block); BatchNorm keeps it.
    _C.MODEL.ALB.NORM = "BN"

    # ---------------------------------------------------------------- Architecture search
    _C.SEARCH = CN()
    _C.SEARCH.EPOCHS = 15
    _C.SEARCH.SEED = 0  # fixed seed that halves the training split into w / alpha halves
    _C.SEARCH.W_LR = 0.02  # SGD on w, cosine-annealed to 0
    _C.SEARCH.W_MOMENTUM = 0.9
    _C.SEARCH.W_WEIGHT_DECAY = 3e-4
    # Adam on alpha. Each step moves an alpha by about ALPHA_LR, so ALPHA_LR x (alpha steps)
    # bounds how far the ops' weights can separate: the paper's 3e-4 suits searches of
    # thousands of steps; a short search needs a larger rate (the search warns below 0.5).
    _C.SEARCH.ALPHA_LR = 3e-4
    _C.SEARCH.ALPHA_BETAS = (0.5, 0.999)
    _C.SEARCH.ALPHA_WEIGHT_DECAY = 1e-3
    # Epochs at the start in which only w is trained (alpha fixed), so that alpha compares ops
    # whose weights have begun to fit instead of their random initialisations.
    _C.SEARCH.WARMUP_EPOCHS = 0
    _C.SEARCH.CHECKPOINT_PERIOD = 1  # epochs between checkpoints

    # ---------------------------------------------------------------- Relation Transfer Module
    _C.MODEL.RTM = CN()
    _C.MODEL.RTM.ENABLED = False
    # Output size E of W_E ((P+1) x E).
    _C.MODEL.RTM.EMBED_DIM = 128
    # Number of lesion types of the multi-type classifier (DeepLesion: 8).
    _C.MODEL.RTM.NUM_TYPES = 8

    # ---------------------------------------------------------------- Fine-tuning (Table 4)
    # Sub-modules of the meta-architecture frozen by ElixirTrainer.build_model (dotted names,
    # e.g. ["backbone", "proposal_generator"]): no gradient, no update, norms kept in eval mode.
    # detectron2's MODEL.BACKBONE.FREEZE_AT stops at the ResNet stages (FPN and RPN stay free).
    _C.MODEL.FREEZE_MODULES = []

    # ---------------------------------------------------------------- Evaluation
    _C.TEST.FROC_FPS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
    # How the FROC measures boxes and reads the curve (docs/evaluation.md, FROC conventions):
    # "continuous" (areas (x2 - x1)(y2 - y1), sensitivity interpolated between FP counts) or
    # "deeplesion" (the DeepLesion authors' code: +1-pixel areas, the step at floor(f x images)
    # FPs), which the configs that compare with published DeepLesion numbers set.
    _C.TEST.FROC_CONVENTION = "continuous"
