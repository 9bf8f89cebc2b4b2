"""The exceptions the engine raises for bad arguments.

Each derives from the Python class that says what is wrong (ValueError, TypeError) and from the
class PyTorch raises for the same mistake (RuntimeError, or its subclass NotImplementedError for
a dtype a kernel lacks), so code written against torch catches the engine's errors unchanged.
"""


class InvalidArgument(ValueError, RuntimeError):
    """A value, shape, device or combination of arguments the op does not accept."""


class InvalidDtype(TypeError, NotImplementedError):
    """A dtype the op does not accept (integer inputs, mixed dtypes, a mask of the wrong kind)."""
