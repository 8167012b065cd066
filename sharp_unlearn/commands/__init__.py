"""Sub-commands, one module each; the list below is the whole CLI."""
from sharp_unlearn.commands import (
    compare,  # noqa: F401,E402
    config_show,  # noqa: F401,E402
    convert,  # noqa: F401,E402
    demo,  # noqa: F401,E402
    evaluate,  # noqa: F401,E402
    mask,  # noqa: F401,E402
    memorization,  # noqa: F401,E402
    pretrain,  # noqa: F401,E402
    reproduce,  # noqa: F401,E402
    sweep,  # noqa: F401,E402
    unlearn,  # noqa: F401,E402
)
from sharp_unlearn.commands.base import COMMANDS, Command

__all__ = ["COMMANDS", "Command"]
