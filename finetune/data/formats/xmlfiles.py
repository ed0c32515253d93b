"""Parsing untrusted XML (Pascal VOC, CVAT) with defusedxml: DTDs, entity declarations and external references
are refused, so entity-expansion bombs and ``SYSTEM "file:///..."`` entities never reach the parser."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import defusedxml
import defusedxml.ElementTree

# The first element's name, after any XML declaration, comments, processing instructions or DOCTYPE.
_FIRST_TAG = re.compile(rb"<([A-Za-z_][\w.:-]*)")
_MAX_XML_BYTES = 256 * 1024 * 1024


def parse_xml(path: Path, *, shown: str) -> ElementTree.Element:
    """The root element of ``path``; ValueError naming ``shown`` (and the line, when the parser gives one)."""
    try:
        size = path.stat().st_size
        if size > _MAX_XML_BYTES:
            raise ValueError(f"{shown} is {size} bytes; XML annotation files above {_MAX_XML_BYTES} are refused")
        with path.open("rb") as handle:
            tree = defusedxml.ElementTree.parse(handle, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DTDForbidden:
        raise ValueError(f"{shown}: XML with a DOCTYPE (DTD) is refused") from None
    except defusedxml.EntitiesForbidden:
        raise ValueError(f"{shown}: XML declaring entities is refused (entity expansion bombs)") from None
    except defusedxml.ExternalReferenceForbidden:
        raise ValueError(f"{shown}: XML referring to external resources is refused") from None
    except ElementTree.ParseError as error:
        line, column = getattr(error, "position", (0, 0))
        raise ValueError(f"{shown} line {line}, column {column}: malformed XML ({error})") from None
    except OSError as error:
        raise ValueError(f"cannot read {shown}: {error}") from None
    return tree.getroot()


def first_tag(path: Path) -> str | None:
    """The name of the document element, sniffed from the first 4 KB without parsing (for format detection)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError:
        return None
    match = _FIRST_TAG.search(head)
    return None if match is None else match.group(1).decode("ascii", "replace")


def text_of(element: ElementTree.Element | None, tag: str) -> str | None:
    child = None if element is None else element.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def number(text: str | None) -> float | str | None:
    """A coordinate as float, else the text itself (validation counts it as not finite)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text
