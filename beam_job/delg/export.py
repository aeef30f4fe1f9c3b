"""Exporters: our DELG as a TF2 SavedModel (`serving_default`) or a TF1-style SavedModel driven by `.prune`.

TF2 (`export_tf2`): `tf.saved_model.save` of a DelgExtractionModule; its single input-signatured
`ExtractFeatures` becomes `serving_default` with the official inputs (input_image uint8 [None,None,3],
input_scales float32 [None], input_max_feature_num int32 [], input_abs_thres float32 [],
input_global_scales_ind int32 [None]) and outputs boxes (None,4), features (None,128),
global_descriptors (None,None), scales (None,), scores (None,1), all float32.

TF1 (`export_tf1`): the same computation frozen into a graph (variables become constants), with
placeholders named input_image ... input_global_scales_ind and identity outputs named boxes, features,
scales, scores, global_descriptors, saved with `tf.compat.v1.saved_model.Builder` under the `serve` tag
and a `serving_default` signature. This is how the official pretrained tarballs are laid out, so
`tf.saved_model.load(path).prune(['input_image:0', ...], ['boxes:0', ...])` works on it.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
from tensorflow.python.util import deprecation

from beam_job.delg.graph import DelgExtractionModule

logger = logging.getLogger(__name__)


def _as_module(model_or_module, **module_kwargs: Any) -> DelgExtractionModule:
    if isinstance(model_or_module, DelgExtractionModule):
        if module_kwargs:
            raise ValueError(f"module options {sorted(module_kwargs)} given with an already built module")
        return model_or_module
    return DelgExtractionModule(model_or_module, **module_kwargs)


def _prepare_dir(path: str | os.PathLike, overwrite: bool) -> str:
    path = os.fspath(path)
    if os.path.exists(path):
        if not overwrite and os.listdir(path):
            raise ValueError(f"export path {path} exists and is not empty; remove it or pass overwrite=True")
        shutil.rmtree(path)
    return path


def export_tf2(model_or_module, path, *, overwrite: bool = False, **module_kwargs: Any) -> str:
    """Write a TF2 SavedModel whose `serving_default` is the official DELG signature. Returns the path.

    model_or_module: a DelgKerasModel (module_kwargs go to DelgExtractionModule: local, global_,
    global_scales_input, global_at_all_scales, iou_threshold) or a ready DelgExtractionModule.
    """
    module = _as_module(model_or_module, **module_kwargs)
    path = _prepare_dir(path, overwrite)
    tf.saved_model.save(module, path)
    logger.info("exported TF2 DELG SavedModel to %s (inputs %s)", path, module.input_names)
    return path


def _frozen_graph(module: DelgExtractionModule):
    """Freeze ExtractFeatures: (GraphDef, {input name: tensor name}, {output name: tensor name})."""
    concrete = module.ExtractFeatures.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    graph_def = frozen.graph.as_graph_def()
    inputs = {}
    for name, tensor in zip(module.input_names, frozen.inputs, strict=True):
        if not tensor.name.startswith(name):
            raise RuntimeError(f"frozen input {tensor.name} does not match {name}")
        inputs[name] = tensor.name
    # The frozen function keeps the concrete function's flat outputs, i.e. the dict in sorted key order.
    names = sorted(concrete.structured_outputs)
    if len(names) != len(frozen.outputs):
        raise RuntimeError(f"frozen function has {len(frozen.outputs)} outputs, expected {names}")
    outputs = {name: tensor.name for name, tensor in zip(names, frozen.outputs, strict=True)}
    # tf.function makes its return values wait (control edges) on every stateful op, i.e. on both scale loops.
    # Frozen, nothing is stateful any more; drop those edges so that each output depends only on the inputs
    # its data needs and `.prune` can fetch the local or the global outputs alone.
    output_nodes = {tensor_name.split(":")[0] for tensor_name in outputs.values()}
    for node in graph_def.node:
        if node.name in output_nodes:
            data_inputs = [i for i in node.input if not i.startswith("^")]
            del node.input[:]
            node.input.extend(data_inputs)
    return graph_def, inputs, outputs


def export_tf1(
    model_or_module,
    path,
    *,
    local: bool = True,
    global_: bool = True,
    global_scales_input: bool = True,
    overwrite: bool = False,
    **module_kwargs: Any,
) -> str:
    """Write a TF1-style (graph + Builder) SavedModel driven through `.prune` on tensor names. Returns the path.

    Variants: local-only (`global_=False`: no input_global_scales_ind, no global_descriptors), global-only
    (`local=False`: inputs input_image, input_scales[, input_global_scales_ind]; output global_descriptors),
    and the Kaggle 2020 layout (`global_scales_input=False`: global_descriptors depends only on
    input_image and input_scales, one row per scale).
    """
    if isinstance(model_or_module, DelgExtractionModule):
        module = _as_module(model_or_module, **module_kwargs)
    else:
        module = DelgExtractionModule(
            model_or_module, local=local, global_=global_, global_scales_input=global_scales_input, **module_kwargs
        )
    graph_def, frozen_inputs, frozen_outputs = _frozen_graph(module)
    path = _prepare_dir(path, overwrite)

    graph = tf.Graph()
    # The TF1 SavedModel APIs log deprecation warnings; writing this legacy format is the point here.
    with graph.as_default(), deprecation.silence():
        placeholders: dict[str, tf.Tensor] = {}
        for name in module.input_names:
            spec = DelgExtractionModule.input_spec(name)
            placeholders[name] = tf.compat.v1.placeholder(spec.dtype, spec.shape, name=name)
        input_map = {frozen_inputs[name]: placeholders[name] for name in module.input_names}
        output_order = list(module.output_names)
        imported = tf.compat.v1.import_graph_def(
            graph_def, input_map=input_map, return_elements=[frozen_outputs[n] for n in output_order], name="delg"
        )
        outputs = {name: tf.identity(tensor, name=name) for name, tensor in zip(output_order, imported, strict=True)}
        signature = tf.compat.v1.saved_model.signature_def_utils.predict_signature_def(
            inputs=placeholders, outputs=outputs
        )
        with tf.compat.v1.Session(graph=graph) as sess:
            builder = tf.compat.v1.saved_model.Builder(path)
            builder.add_meta_graph_and_variables(
                sess,
                [tf.compat.v1.saved_model.tag_constants.SERVING],
                signature_def_map={
                    tf.compat.v1.saved_model.signature_constants.DEFAULT_SERVING_SIGNATURE_DEF_KEY: signature
                },
                strip_default_attrs=True,
            )
            builder.save()
    logger.info("exported TF1-style DELG SavedModel to %s (inputs %s, outputs %s)", path, module.input_names,
                module.output_names)
    return path
