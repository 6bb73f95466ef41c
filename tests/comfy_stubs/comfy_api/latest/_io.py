"""Test double of ComfyUI 0.3.64's ``comfy_api.latest._io`` (commit a125cd84), the module that
``from comfy_api.latest import io`` gives.

Only what the pack's nodes use: Schema, ComfyNode, NodeOutput and the Input/Output classes of
Boolean, Int, Float, String, Combo, Model, Conditioning, Latent, Sampler and Sigmas. Every
``__init__`` has exactly ComfyUI 0.3.64's parameters, in its order and with its defaults (none of
them keyword-only), so a keyword ComfyUI lacks raises TypeError here as it does there. Values are
just stored; no serialisation to /object_info.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


class _ComfyType:
    Type = Any
    io_type: str = None


def comfytype(io_type: str):
    """Binds io_type to the class and gives it its own Input/Output subclasses whose Parent it is."""

    def decorator(cls):
        cls.io_type = io_type
        for attr in ("Input", "Output"):
            base = getattr(cls, attr, None)
            if base is not None:
                own = type(base.__name__, (base,), {"__qualname__": f"{cls.__name__}.{attr}"})
                own.Parent = cls
                setattr(cls, attr, own)
        return cls

    return decorator


class _IO_V3:
    Parent: type[_ComfyType] = None

    @property
    def io_type(self):
        return self.Parent.io_type


class Input(_IO_V3):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 extra_dict=None):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict if extra_dict is not None else {}


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 default: Any = None,
                 socketless: bool = None, widget_type: str = None, force_input: bool = None, extra_dict=None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input


class Output(_IO_V3):
    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list


class ComfyTypeI(_ComfyType):
    class Input(Input):
        ...


class ComfyTypeIO(ComfyTypeI):
    class Output(Output):
        ...


@comfytype(io_type="BOOLEAN")
class Boolean(ComfyTypeIO):
    Type = bool

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, default: bool = None, label_on: str = None, label_off: str = None,
                     socketless: bool = None, force_input: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.label_on = label_on
            self.label_off = label_off


@comfytype(io_type="INT")
class Int(ComfyTypeIO):
    Type = int

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, default: int = None, min: int = None, max: int = None, step: int = None,
                     control_after_generate: bool = None, display_mode: NumberDisplay = None,
                     socketless: bool = None, force_input: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min = min
            self.max = max
            self.step = step
            self.control_after_generate = control_after_generate
            self.display_mode = display_mode


@comfytype(io_type="FLOAT")
class Float(ComfyTypeIO):
    Type = float

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, default: float = None, min: float = None, max: float = None,
                     step: float = None, round: float = None, display_mode: NumberDisplay = None,
                     socketless: bool = None, force_input: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min = min
            self.max = max
            self.step = step
            self.round = round
            self.display_mode = display_mode


@comfytype(io_type="STRING")
class String(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, multiline=False, placeholder: str = None, default: str = None,
                     dynamic_prompts: bool = None, socketless: bool = None, force_input: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.multiline = multiline
            self.placeholder = placeholder
            self.dynamic_prompts = dynamic_prompts


@comfytype(io_type="COMBO")
class Combo(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, options: list[str] | list[int] | type[Enum] = None, display_name: str = None,
                     optional=False, tooltip: str = None, lazy: bool = None, default: str | int | Enum = None,
                     control_after_generate: bool = None, upload=None, image_folder=None, remote=None,
                     socketless: bool = None):
            if isinstance(options, type) and issubclass(options, Enum):
                options = [v.value for v in options]
            if isinstance(default, Enum):
                default = default.value
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
            self.multiselect = False
            self.options = options
            self.control_after_generate = control_after_generate
            self.upload = upload
            self.image_folder = image_folder
            self.remote = remote

    class Output(Output):
        def __init__(self, id: str = None, display_name: str = None, options: list[str] = None, tooltip: str = None,
                     is_output_list=False):
            super().__init__(id, display_name, tooltip, is_output_list)
            self.options = options if options is not None else []


@comfytype(io_type="MODEL")
class Model(ComfyTypeIO):
    pass


@comfytype(io_type="CONDITIONING")
class Conditioning(ComfyTypeIO):
    pass


@comfytype(io_type="LATENT")
class Latent(ComfyTypeIO):
    pass


@comfytype(io_type="SAMPLER")
class Sampler(ComfyTypeIO):
    pass


@comfytype(io_type="SIGMAS")
class Sigmas(ComfyTypeIO):
    pass


def Custom(io_type: str) -> type[ComfyTypeIO]:
    """A ComfyType for a custom io_type (ComfyUI 0.3.64's io.Custom)."""

    @comfytype(io_type=io_type)
    class CustomComfyType(ComfyTypeIO):
        ...

    return CustomComfyType


@comfytype(io_type="CLIP")
class Clip(ComfyTypeIO):
    pass


@comfytype(io_type="IMAGE")
class Image(ComfyTypeIO):
    pass


@comfytype(io_type="LORA_MODEL")
class LoraModel(ComfyTypeIO):
    pass


@dataclass
class Schema:
    """Definition of V3 node properties (ComfyUI 0.3.64's fields, order and defaults)."""

    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list[Input] = None
    outputs: list[Output] = None
    hidden: list = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self):
        """As ComfyUI: input ids, output ids and the two together must be unique."""
        input_ids = [i.id for i in self.inputs] if self.inputs is not None else []
        output_ids = [o.id for o in self.outputs] if self.outputs is not None else []
        issues = []
        if len(set(input_ids)) != len(input_ids):
            issues.append(f"Input ids must be unique, but {[k for k, n in Counter(input_ids).items() if n > 1]} are not.")
        if len(set(output_ids)) != len(output_ids):
            issues.append(f"Output ids must be unique, but {[k for k, n in Counter(output_ids).items() if n > 1]} are not.")
        if set(input_ids) & set(output_ids):
            issues.append(f"Ids must be unique between inputs and outputs, but {set(input_ids) & set(output_ids)} are not.")
        if issues:
            raise ValueError("\n".join(issues))


class ComfyNode:
    """Common base class for all V3 nodes."""

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError


class _UIOutput:
    def __init__(self):
        pass

    def as_dict(self) -> dict:
        raise NotImplementedError


class NodeOutput:
    """Standardized output of a node: any number of args and/or a UI output in `ui`."""

    def __init__(self, *args: Any, ui: _UIOutput | dict = None, expand: dict = None, block_execution: str = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index) -> Any:
        return self.args[index]
