"""Architecture-agnostic data: scanning, captions, aspect and frame buckets, video clips, latent/text caches,
resumable batches."""
from .buckets import bucket_for, fit_to_bucket, to_tensor
from .cache import LatentCache, TextCache
from .captions import inject_trigger, process_caption, read_caption
from .dataset import Batch, BucketBatches, DataError, DataPipeline, Item, build_items, load_batch, scan_images
from .images import IMAGE_EXTS, ImageError, image_size, load_image
from .video import (
    VIDEO_EXTS, ClipError, ClipInfo, FrameSelection, frame_count_for, probe_clip, read_frames, select_frames,
)

__all__ = [
    "IMAGE_EXTS", "Batch", "BucketBatches", "DataError", "DataPipeline", "ImageError", "Item", "LatentCache",
    "TextCache", "bucket_for", "build_items", "fit_to_bucket", "image_size", "inject_trigger", "load_batch",
    "load_image", "process_caption", "read_caption", "scan_images", "to_tensor",
    "VIDEO_EXTS", "ClipError", "ClipInfo", "FrameSelection", "frame_count_for", "probe_clip", "read_frames",
    "select_frames",
]
