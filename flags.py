"""Command-line flags from a config dataclass: each option, its default and its help are
defined once (a field made with option()), for train.py and train_judge.py."""
import argparse
from dataclasses import field, fields


def option(default, help, **kw):
    """A config field and its flag's help; choices=[...] limits the values. A tuple field is a
    list of strings on the command line."""
    return field(default=default, metadata={"help": help, **kw})


def config_parser(cls, description, only_given=False, **kw):
    """An ArgumentParser with one flag per field of the dataclass cls: --field-name, of the
    field's type and choices; booleans as --x / --no-x. With only_given=True the namespace holds
    only the flags typed (so a resumed run's saved config can supply the rest); --help shows
    every default either way."""
    if only_given:
        kw["argument_default"] = argparse.SUPPRESS
    ap = argparse.ArgumentParser(description=description, **kw)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%")
        default = {} if only_given else {"default": f.default}
        if f.type is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=text, **default)
        elif f.type is tuple:  # a list of strings: --flag A B C
            ap.add_argument(flag, nargs="*", type=str, help=text, **default)
        else:
            ap.add_argument(flag, type=f.type, choices=f.metadata.get("choices"), help=text,
                            **default)
    return ap


def config_from_flags(cls, argv=None, description=None):
    """Parse argv into cls(**flags), every field from its flag or its default."""
    return cls(**vars(config_parser(cls, description).parse_args(argv)))
