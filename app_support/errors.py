"""Turning failures inside event handlers into messages the visitor sees, without ever taking the server down.

Known bad input (an unreadable image, a path outside the allow-list, a broken zip, a model that does not load)
becomes a ``gr.Error`` carrying its own message. Anything unexpected is logged with its traceback and shown as a
short generic error, so internals (paths, stack frames) are not leaked to visitors.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

import gradio as gr

logger = logging.getLogger("ddetr.app")

Handler = TypeVar("Handler", bound=Callable[..., Any])


class UserFacingError(Exception):
    """Base of this package's errors whose message is written for the visitor (what failed and what to do)."""


# ValueError covers ddetr.ImageInputError, argument validation, the path and archive errors of this package, and the
# dataset errors of finetune, all of which describe the input that was refused.
_USER_ERRORS: tuple[type[BaseException], ...] = (UserFacingError, ValueError, FileNotFoundError)


# An absolute path inside a message (not the tail of a URL or of "owner/name"): keep only its last part.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/]+/)+([^\s'\"/]+)")


def strip_paths(message: str) -> str:
    """``message`` with absolute paths cut to their file name: server layout is nobody's business."""
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1), message)


def as_user_error(error: BaseException) -> gr.Error:
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, _USER_ERRORS):
        return gr.Error(strip_paths(str(error)) or type(error).__name__)
    logger.exception("unexpected error in an event handler", exc_info=error)
    return gr.Error(f"Something went wrong on the server ({type(error).__name__}); the error was logged.")


def user_errors(handler: Handler) -> Handler:
    """Decorate an event handler (plain function or generator) so every failure reaches the user as ``gr.Error``."""
    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def generator_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from handler(*args, **kwargs)
            except Exception as error:
                raise as_user_error(error) from error

        return generator_wrapper  # type: ignore[return-value]

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except Exception as error:
            raise as_user_error(error) from error

    return wrapper  # type: ignore[return-value]
