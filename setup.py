"""The C part of vtpm-trust (metadata lives in pyproject.toml).

verifier/eventlog/_native.c walks event-log records and replays PCR banks
(see docs/eventlog.md, "The appraisal path"); it links OpenSSL's libcrypto
(Debian: libssl-dev) for the hashes. verifier/ima/_native.c walks binary IMA
measurement lists, replays PCR 10 and looks entries up in a runtime policy
(docs/ima.md, "Performance"); the same libcrypto.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "verifier.eventlog._native",
            ["verifier/eventlog/_native.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "verifier.ima._native",
            ["verifier/ima/_native.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ]
)
