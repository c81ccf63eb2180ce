"""What an ONNX file says of its tensors: the names a native backend looks them up by, the
input's shape (to check against a contract) and the output's element type."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# onnx.TensorProto's element types that a contract can name.
ELEMENT_TYPES = {1: "float32", 10: "float16"}


@dataclass(frozen=True)
class Graph:
    input_name: str
    input_shape: tuple[int | str, ...]  # batch first; a free dimension by its name, or "?"
    output_name: str
    output_dtype: str

    def accepts(self, item_shape: tuple[int, ...]) -> bool:
        """Whether a batch of inputs of ``item_shape`` fits the graph's input."""
        dims = self.input_shape[1:]
        return len(dims) == len(item_shape) and all(
            not isinstance(d, int) or d in (0, n) for d, n in zip(dims, item_shape, strict=True)
        )


def graph_of(path: Path) -> Graph:
    """The graph's first input and first output; ValueError where the file is no ONNX model
    or its output is of a type a contract cannot name."""
    import onnx  # only an ONNX model needs it
    from google.protobuf.message import Error as ProtobufError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, ProtobufError) as exc:
        raise ValueError(f"not an ONNX model ({type(exc).__name__})") from None
    graph = model.graph
    weights = {t.name for t in graph.initializer}  # old exporters list them as inputs
    inputs = [i for i in graph.input if i.name not in weights]
    if not inputs or not graph.output:
        raise ValueError("the ONNX graph has no input or no output")
    out = graph.output[0]
    dtype = ELEMENT_TYPES.get(out.type.tensor_type.elem_type)
    if dtype is None:
        raise ValueError(f"its output {out.name} is not float32 or float16")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims)
    return Graph(inputs[0].name, shape, out.name, dtype)
