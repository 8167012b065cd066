"""Sub-commands, one module each; the list below is the whole CLI."""
from sharp_unlearn.commands.base import COMMANDS, Command
from sharp_unlearn.commands import pretrain  # noqa: F401,E402
from sharp_unlearn.commands import unlearn  # noqa: F401,E402
from sharp_unlearn.commands import demo  # noqa: F401,E402
from sharp_unlearn.commands import sweep  # noqa: F401,E402
from sharp_unlearn.commands import reproduce  # noqa: F401,E402
from sharp_unlearn.commands import compare  # noqa: F401,E402
from sharp_unlearn.commands import evaluate  # noqa: F401,E402
from sharp_unlearn.commands import convert  # noqa: F401,E402
from sharp_unlearn.commands import memorization  # noqa: F401,E402
from sharp_unlearn.commands import mask  # noqa: F401,E402

__all__ = ["COMMANDS", "Command"]
