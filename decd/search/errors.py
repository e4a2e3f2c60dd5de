"""The errors of `decd.search`, in the one module every other one imports: each is one line saying what to do."""


class GalleryIndexError(ValueError):
    """A user-facing problem with a gallery or an index (the message says what to do)."""


class IndexNotFoundError(GalleryIndexError, FileNotFoundError):
    """A gallery folder or an index folder that does not exist (or an unfinished index)."""


class StaleIndexError(GalleryIndexError):
    """The index was built by another model than the one asked to search it."""


class MilvusStoreError(GalleryIndexError):
    """A problem with a Milvus store or collection that the user can fix (one line naming the URI and what to do)."""


class BuildInterrupted(RuntimeError):
    """A build stopped before the end (`max_batches`, or another process stopped); its progress is kept: build again
    to resume."""


class SkippedImagesWarning(UserWarning):
    """Some gallery files could not be read and were left out (all listed in the gallery's `skipped`)."""
