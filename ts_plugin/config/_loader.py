"""Safe YAML loading that remembers where every key and item sits in the file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import yaml

KeyPath = Tuple[Any, ...]


@dataclass
class LoadedYaml:
    data: Any
    # path -> (line, column), 1-based; for a mapping entry the key's position
    positions: Dict[KeyPath, Tuple[int, int]] = field(default_factory=dict)
    # mapping keys written twice: the later one wins silently in YAML and in the frontend
    duplicates: List[KeyPath] = field(default_factory=list)

    def position(self, path: KeyPath) -> Tuple[int, int]:
        """The position of `path`, or of its nearest ancestor that exists in the file."""
        path = tuple(path)
        while path:
            if path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return self.positions.get((), (1, 1))


class YamlSyntaxError(ValueError):
    def __init__(self, message: str, line: int, column: int):
        super().__init__(message)
        self.line = line
        self.column = column


def load_yaml(text: str) -> LoadedYaml:
    """Parse `text` with PyYAML's safe loader; raise YamlSyntaxError with the line on bad YAML."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return LoadedYaml(data=None)
        # positions first: constructing the document flattens merge keys (`<<`) into the mapping
        loaded = LoadedYaml(data=None)
        loaded.positions[()] = (root.start_mark.line + 1, root.start_mark.column + 1)
        _record(root, (), loaded, set(), loader)
        loaded.data = loader.construct_document(root)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = err.problem or str(err)
        if err.context and err.context_mark:
            message += f" ({err.context} at line {err.context_mark.line + 1})"
        raise YamlSyntaxError(message, line, column) from None
    except yaml.YAMLError as err:
        raise YamlSyntaxError(str(err), 1, 1) from None
    finally:
        loader.dispose()
    return loaded


def _record(node: yaml.Node, path: KeyPath, loaded: LoadedYaml, seen: set, loader: yaml.SafeLoader) -> None:
    if id(node) in seen:  # aliases can make the node graph cyclic
        return
    seen = seen | {id(node)}
    if isinstance(node, yaml.MappingNode):
        merges = [v for k, v in node.value if k.tag == "tag:yaml.org,2002:merge"]
        for merged in merges:  # merged keys first, so the mapping's own keys override their positions
            for source in merged.value if isinstance(merged, yaml.SequenceNode) else [merged]:
                _record(source, path, loaded, seen, loader)
        keys_here = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node)  # `0:` is the int 0, as in the data
            child = path + (key,)
            if key in keys_here:
                loaded.duplicates.append(child)
            keys_here.add(key)
            loaded.positions[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _record(value_node, child, loaded, seen, loader)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = path + (index,)
            loaded.positions[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _record(item, child, loaded, seen, loader)
