"""The two kinds of bad input every command reports in one line: a setting (run or site file) and the data itself."""


class ConfigError(ValueError):
    """A run setting or a site file's key is missing, unknown or out of range; the message names it."""


class DataError(ValueError):
    """Input data that cannot be used as it is; the message says what and where."""


class NotAnImage(DataError):
    """A file that reads but holds no image to train on (a DICOMDIR, a segmentation, an RT plan or dose grid, a report):
    counted and listed, never a reason to stop a site."""
