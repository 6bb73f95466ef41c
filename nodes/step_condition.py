"""A TDM-unify student's step condition inside ComfyUI (no comfy import: testable without it).

The TDM LoRA Loader puts a :class:`StepConditionWrapper` on the MODEL it returns, as a ComfyUI
``apply_model`` wrapper (``ModelPatcher.add_wrapper_with_key``): wrappers belong to one patcher
and are copied by ``clone()``, so the model the loader was given and every other clone of the
same weights never see it. For the duration of each model call the wrapper adds c_K to the
output of ``diffusion_model.<comfy_target>`` (tdm_train's ``step_embedding.applied``: a forward
hook, removed when the call returns, so nothing stays registered between calls).

K comes from ``transformer_options["tdm_num_steps"]``, which the TDM samplers put there for
their calls (:func:`with_num_steps`): the TDM Sampler uses the number of steps it samples
(``len(sigmas) - 1``), the TDM KSampler the K of its full grid (also for img2img, whose grid is
that K-grid cut at the denoise level). A K the student was not trained for is refused, with the
trained list. A model sampled by any other sampler (K unknown) runs as the largest trained K,
with a warning in the log once per sampling run.
"""

from __future__ import annotations

import logging

from tdm_train.lora.step_embedding import StepConditions, condition_target, applied

NUM_STEPS_OPTION = "tdm_num_steps"  # transformer_options key the TDM samplers set
WRAPPER_KEY = "tdm_step_condition"  # the key of our apply_model wrapper on the patcher
APPLY_MODEL = "apply_model"  # comfy.patcher_extension.WrappersMP.APPLY_MODEL

log = logging.getLogger(__name__)


class StepConditionWrapper:
    """ComfyUI ``apply_model`` wrapper ``(executor, x, t, c_concat, c_crossattn, control,
    transformer_options, **kwargs)``: runs the call with c_K added on the target Linear of
    ``executor.class_obj.diffusion_model`` (the BaseModel being called)."""

    def __init__(self, conditions: StepConditions, source: str = "TDM-unify LoRA"):
        if not conditions.comfy_target:
            raise ValueError(f"{source}: its step condition names no ComfyUI layer (comfy_target), so it cannot be "
                             "applied to a ComfyUI MODEL")
        self.conditions = conditions
        self.source = source
        self._warned_for = None

    @property
    def steps(self) -> list[int]:
        return self.conditions.steps

    def accept(self, num_steps: int) -> None:
        self.conditions.vector(num_steps)  # refuses an untrained K, naming the trained ones

    def check(self, diffusion_model) -> None:
        """Fails now (at load time) for a model without the target layer or of another width."""
        module = condition_target(diffusion_model, self.conditions.comfy_target)
        if module.out_features != self.conditions.dim:
            raise ValueError(f"{self.source}: step condition of width {self.conditions.dim} for "
                             f"{self.conditions.comfy_target} of width {module.out_features} (a LoRA for another model?)")

    def num_steps(self, transformer_options: dict) -> int:
        steps = transformer_options.get(NUM_STEPS_OPTION)
        if steps is not None:
            self.accept(steps)
            return int(steps)
        steps = max(self.steps)
        run = id(transformer_options.get("sample_sigmas"))  # one sampling run shares its sigmas tensor
        if run != self._warned_for:
            self._warned_for = run
            log.warning("%s: a TDM-unify student (trained for K = %s) sampled by a sampler that does not say "
                        "its step count: running it as the %d-step student. Sample it with the TDM Sampler or "
                        "the TDM KSampler to condition it on the steps actually sampled.",
                        self.source, ", ".join(map(str, self.steps)), steps)
        return steps

    def __call__(self, executor, *args, **kwargs):
        if "transformer_options" in kwargs:
            options = kwargs["transformer_options"]
        else:
            options = args[5] if len(args) > 5 else {}
        diffusion_model = executor.class_obj.diffusion_model
        with applied(diffusion_model, self.conditions, self.num_steps(options or {}), self.conditions.comfy_target):
            return executor(*args, **kwargs)


class FixedStepsWrapper:
    """``apply_model`` wrapper of an engine exported for one K of a TDM-unify student (its c_K is
    folded into the network): a TDM sampler that samples another step count is refused; other
    samplers get a warning (they sample whatever sigmas they are given)."""

    def __init__(self, num_steps: int, unify_steps: list[int], source: str = "TDM engine"):
        self.num_steps, self.steps, self.source = int(num_steps), list(unify_steps), source
        self._warned_for = None

    def accept(self, num_steps: int) -> None:
        if int(num_steps) != self.num_steps:
            raise ValueError(f"{self.source} was exported for {self.num_steps} sampling steps (its TDM-unify "
                             f"student's c_{self.num_steps} is folded in; the student was trained for K = "
                             f"{self.steps}), not {num_steps}: sample it with {self.num_steps} steps, or export "
                             f"the student again for {num_steps}")

    def __call__(self, executor, *args, **kwargs):
        options = kwargs["transformer_options"] if "transformer_options" in kwargs else (args[5] if len(args) > 5 else {})
        steps = (options or {}).get(NUM_STEPS_OPTION)
        if steps is not None:
            self.accept(steps)
        elif id((options or {}).get("sample_sigmas")) != self._warned_for:
            self._warned_for = id((options or {}).get("sample_sigmas"))
            log.warning("%s is the %d-step TDM-unify student; this sampler does not say its step count, so "
                        "nothing checks it samples %d steps", self.source, self.num_steps, self.num_steps)
        return executor(*args, **kwargs)


def attach(patcher, conditions: StepConditions, source: str) -> StepConditionWrapper:
    """Puts a TDM-unify student's step condition on ``patcher`` (a ComfyUI ModelPatcher, a clone:
    the wrapper lives on this patcher only), replacing one a previous unify LoRA put there."""
    wrapper = StepConditionWrapper(conditions, source)
    wrapper.check(patcher.model.diffusion_model)
    previous = attached(patcher.wrappers)
    if previous is not None:
        log.warning("%s replaces the step condition of %s (one MODEL carries one)", source, previous.source)
        patcher.remove_wrappers_with_key(APPLY_MODEL, WRAPPER_KEY)
    patcher.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, wrapper)
    return wrapper


def attached(wrappers: dict) -> StepConditionWrapper | None:
    """Our wrapper in a patcher's ``wrappers`` (or a transformer_options' ``wrappers``) dict."""
    found = wrappers.get(APPLY_MODEL, {}).get(WRAPPER_KEY, [])
    return found[-1] if found else None


def sampled_conditions(model_options: dict | None) -> StepConditionWrapper | None:
    """The step condition of the model a sampler function is running (its extra_args' model_options)."""
    options = (model_options or {}).get("transformer_options", {})
    return attached(options.get("wrappers", {}))


def with_num_steps(extra_args: dict, num_steps: int) -> dict:
    """A copy of a sampler's extra_args whose model calls carry K in transformer_options (the
    caller's dicts are left as they were). A TDM-unify model not trained for K is refused here,
    before the first step."""
    model_options = dict(extra_args.get("model_options") or {})
    wrapper = sampled_conditions(model_options)
    if wrapper is not None:
        wrapper.accept(num_steps)
    model_options["transformer_options"] = {**model_options.get("transformer_options", {}),
                                            NUM_STEPS_OPTION: int(num_steps)}
    return {**extra_args, "model_options": model_options}


def describe(wrapper: StepConditionWrapper) -> str:
    steps = ", ".join(map(str, wrapper.steps))
    return (f"TDM-unify student for K = {steps} steps (c_K on {wrapper.conditions.comfy_target}): the TDM Sampler "
            f"and TDM KSampler condition it on the steps they sample; other samplers run it as K = "
            f"{max(wrapper.steps)} (with a warning)")
