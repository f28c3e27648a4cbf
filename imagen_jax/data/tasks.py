"""seqio Tasks and Mixtures of captioned images, and the stream precompute reads from them.

A task precompute can read yields {'caption': str, 'text_tokens': int32 [n], 'image': encoded
bytes or uint8 [H, W, 3]} and optionally 'key' (str), with `text_tokens` = the caption's pieces +
EOS, cut to `sequence_length['text_tokens']` with the EOS kept (`TOKEN_PREPROCESSORS`).

Built-in tasks (`register_builtin_tasks`, with the inputs from precompute's flags):
  imagen_shapes, imagen_image_text_folder, imagen_coco_captions  prepared TFDS datasets
  imagen_webdataset                                              tar shards (data/webdataset.py)
Their sources are opened when a dataset is first asked for, so registering them reads and writes
nothing; they yield the images' encoded bytes as stored. `register_task` (tests, notebooks) makes
a task over a prepared TFDS directory that decodes its images.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

TASK_PREFIX = "imagen_"
TEXT_FEATURE = "text_tokens"
BUILTIN_TASKS = (
  "imagen_shapes",
  "imagen_image_text_folder",
  "imagen_coco_captions",
  "imagen_webdataset",
)


def _to_image_text(ex: dict[str, Any]) -> dict[str, Any]:
  """Maps a TFDS example of any supported source to {'image', 'caption', 'key'}."""
  import tensorflow as tf

  key = ex.get("key", ex.get("image/id", ex.get("id")))
  if key is None:
    raise ValueError(f"no key feature in {sorted(ex)}")
  if key.dtype != tf.string:
    key = tf.strings.as_string(key)
  if "caption" in ex:
    caption = ex["caption"]
  elif "captions" in ex:  # coco_captions: the first of its captions
    caption = ex["captions"]["text"][0]
  else:
    raise ValueError(f"no caption feature in {sorted(ex)}")
  return {"image": ex["image"], "caption": caption, "key": key}


def _caption_per_example(ds):
  """One example per caption (coco_captions holds several an image): keys 'id/j'."""
  import tensorflow as tf

  def expand(ex):
    if "captions" not in ex:
      return tf.data.Dataset.from_tensors(_to_image_text(ex))
    texts = ex["captions"]["text"]
    n = tf.shape(texts)[0]
    key = tf.strings.as_string(ex["image/id"])
    keys = tf.strings.join([tf.fill([n], key), tf.strings.as_string(tf.range(n))], "/")
    image = tf.fill([n], ex["image"])
    return tf.data.Dataset.from_tensor_slices({"image": image, "caption": texts, "key": keys})

  return ds.flat_map(expand)


def _copy_caption(ex: dict[str, Any]) -> dict[str, Any]:
  return {**ex, TEXT_FEATURE: ex["caption"]}


def register_task(name: str, dataset_dir: str, vocab_path: str, splits=("train", "validation")):
  """Registers (or replaces) seqio task `imagen_{name}` over a prepared TFDS dataset directory.

  Args:
    name: short source name, e.g. 'shapes'.
    dataset_dir: directory holding the prepared dataset's dataset_info.json.
    vocab_path: SentencePiece model of the T5 vocabulary.
    splits: splits the task offers (those missing on disk are dropped).

  Returns:
    The registered seqio.Task.
  """

  import seqio
  import tensorflow_datasets as tfds

  from imagen_jax.text import vocabulary

  vocab = vocabulary.load_vocabulary(vocab_path)
  builder = tfds.builder_from_directory(dataset_dir)
  available = [s for s in splits if s in builder.info.splits]
  if not available:
    raise ValueError(f"{dataset_dir} has none of the splits {splits}: {list(builder.info.splits)}")

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
    read_config = tfds.ReadConfig(shuffle_seed=seed)
    return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)

  task_name = TASK_PREFIX + name
  seqio.TaskRegistry.remove(task_name)
  return seqio.TaskRegistry.add(
    task_name,
    source=seqio.FunctionDataSource(dataset_fn, splits=available),
    preprocessors=[seqio.map_over_dataset(_to_image_text), *token_preprocessors()],
    output_features=output_features(vocab),
  )


def token_preprocessors() -> list[Callable]:
  """caption -> text_tokens (pieces + EOS, cut keeping the EOS): the last preprocessors of a task."""
  import seqio

  return [
    seqio.map_over_dataset(_copy_caption),
    seqio.preprocessors.tokenize,
    seqio.preprocessors.append_eos_after_trim,
  ]


def output_features(vocab) -> dict[str, Any]:
  """{'text_tokens': Feature} over `vocab` (a seqio Vocabulary)."""
  import seqio

  return {TEXT_FEATURE: seqio.Feature(vocab, add_eos=True, dtype="int32")}


def get_task_dataset(task, split: str, max_length: int, shuffle: bool = False, seed: int = 0):
  """The task's tf.data dataset with captions cut to `max_length` tokens (EOS kept)."""
  return task.get_dataset(
    sequence_length={TEXT_FEATURE: max_length},
    split=split,
    shuffle=shuffle,
    seed=seed,
    use_cached=False,
  )


# ----------------------------------------------------------------------------------------------
# Built-in tasks
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BuiltinInputs:
  """What the built-in tasks read (precompute's flags)."""

  vocab: str
  # Source name ('shapes', 'image_text_folder', 'coco_captions') -> prepared TFDS dataset dir;
  # called when a task's dataset is first asked for (it may build the dataset).
  tfds_dir: Callable[[str], str]
  shapes_splits: Sequence[str] = ("train", "validation")
  image_text_folder_splits: Sequence[str] = ("train",)
  source_dir: str | None = None  # image_text_folder / webdataset
  min_image_size: int = 0
  max_aspect_ratio: float = 0.0
  min_caption_length: int = 0
  max_caption_length: int = 0


def register_builtin_tasks(inputs: BuiltinInputs) -> None:
  """Registers (or replaces) the four built-in tasks over `inputs`; reads and writes nothing."""
  import seqio

  from imagen_jax.data import webdataset
  from imagen_jax.text import vocabulary

  vocab = vocabulary.load_vocabulary(inputs.vocab)
  tfds_splits = {
    "shapes": inputs.shapes_splits,
    "image_text_folder": inputs.image_text_folder_splits,
    "coco_captions": ("train", "validation", "test"),
  }
  for source, splits in tfds_splits.items():
    name = TASK_PREFIX + source
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
        functools.partial(_encoded_tfds_dataset, inputs.tfds_dir, source),
        splits=list(splits),
        caching_permitted=False,
      ),
      preprocessors=[_caption_per_example, *token_preprocessors()],
      output_features=output_features(vocab),
    )
  name = TASK_PREFIX + "webdataset"
  seqio.TaskRegistry.remove(name)
  filters = webdataset.filter_preprocessors(
    inputs.min_image_size,
    inputs.max_aspect_ratio,
    inputs.min_caption_length,
    inputs.max_caption_length,
  )
  seqio.TaskRegistry.add(
    name,
    source=webdataset.make_source(inputs.source_dir or ""),
    preprocessors=[*filters, *token_preprocessors()],
    output_features=output_features(vocab),
  )


def _encoded_tfds_dataset(
  tfds_dir: Callable[[str], str], source: str, split: str, shuffle_files: bool, seed=None
):
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(tfds_dir(source))
  return builder.as_dataset(
    split=split,
    shuffle_files=shuffle_files,
    read_config=tfds.ReadConfig(shuffle_seed=seed),
    # The stored PNG / JPEG bytes, as the shards keep them: no decode and re-encode.
    decoders={"image": tfds.decode.SkipDecoding()},
  )


# ----------------------------------------------------------------------------------------------
# The stream precompute reads
# ----------------------------------------------------------------------------------------------


def leaf_tasks(provider, split: str) -> list:
  """The Tasks a Task or Mixture reads for `split` (a Mixture's in seqio's order)."""
  import seqio

  if isinstance(provider, seqio.Mixture):
    return [t for t in provider.tasks if split in t.splits]
  return [provider]


def stream(provider, split: str, max_length: int, seed: int):
  """The examples of a Task or Mixture in a fixed order, one structure for every task.

  A Task: its unshuffled dataset, one epoch. A Mixture: each of its tasks' unshuffled datasets
  (one epoch each), sampled at the mixture's rates by the mixture's own sampling function
  (seqio's default: `sample_from_datasets(..., stop_on_empty_dataset=True)`) with `seed`, as
  `Mixture.get_dataset(shuffle=False, seed=seed, num_epochs=1)` does; the stream ends when a
  task runs out, so the rates hold to the end.

  Returns:
    (tf.data.Dataset of {'key', 'caption', 'image' (encoded bytes), 'text_tokens', 'task'
    (index into the task list), 'source_index' (-1 when the task has none)}, the Tasks).

  Raises:
    ValueError: a task's examples lack 'caption', 'text_tokens' or 'image'.
  """
  import seqio
  import tensorflow as tf

  tasks = leaf_tasks(provider, split)
  datasets = []
  for i, task in enumerate(tasks):
    # One unshuffled epoch (seqio's default num_epochs=1).
    ds = get_task_dataset(task, split, max_length, shuffle=False, seed=seed)
    missing = [k for k in ("caption", TEXT_FEATURE, "image") if k not in ds.element_spec]
    if missing:
      raise ValueError(
        f"task {task.name!r} yields {sorted(ds.element_spec)}, without {', '.join(missing)}"
      )
    datasets.append(ds.enumerate().map(functools.partial(_normalize, task_index=i)))
  if not isinstance(provider, seqio.Mixture):
    return datasets[0], tasks
  rates = [provider.get_rate(t) for t in tasks]
  sample_fn = getattr(
    provider,
    "_sample_fn",
    functools.partial(tf.data.Dataset.sample_from_datasets, stop_on_empty_dataset=True),
  )
  return sample_fn(datasets, rates, seed), tasks


def _normalize(index, ex: dict[str, Any], task_index: int) -> dict[str, Any]:
  import tensorflow as tf

  image = ex["image"]
  if image.dtype != tf.string:
    image = tf.io.encode_png(tf.cast(image, tf.uint8))
  key = ex.get("key")
  if key is None:
    key = tf.strings.as_string(index)
  elif key.dtype != tf.string:
    key = tf.strings.as_string(key)
  source_index = ex.get("source_index")
  return {
    "key": key,
    "caption": ex["caption"],
    "image": image,
    TEXT_FEATURE: tf.cast(ex[TEXT_FEATURE], tf.int32),
    "task": tf.constant(task_index, tf.int32),
    "source_index": tf.constant(-1, tf.int64)
    if source_index is None
    else tf.cast(source_index, tf.int64),
  }
