"""seqio Tasks: one per source, decoding the image and tokenizing the caption with T5's vocabulary.

Each task yields {'image': uint8 [H, W, 3], 'caption': str, 'key': str, 'text_tokens': int32 [n]}
with `text_tokens` = the caption's pieces + EOS, cut to `sequence_length['text_tokens']` with the
EOS kept. Sources are prepared TFDS directories read with `tfds.builder_from_directory`, so
datasets with generated config names (shapes at any resolution / size) need no registration.
"""

from __future__ import annotations

from typing import Any

TASK_PREFIX = "imagen_"
TEXT_FEATURE = "text_tokens"


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
    preprocessors=[
      seqio.map_over_dataset(_to_image_text),
      seqio.map_over_dataset(_copy_caption),
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos_after_trim,
    ],
    output_features={
      TEXT_FEATURE: seqio.Feature(vocab, add_eos=True, dtype="int32"),
    },
  )


def get_task_dataset(task, split: str, max_length: int, shuffle: bool = False, seed: int = 0):
  """The task's tf.data dataset with captions cut to `max_length` tokens (EOS kept)."""
  return task.get_dataset(
    sequence_length={TEXT_FEATURE: max_length},
    split=split,
    shuffle=shuffle,
    seed=seed,
    use_cached=False,
  )
