"""The documentation site's generated pages (mkdocs-gen-files runs docsgen/pages.py at build
time): the settings, GraphQL and command-line references, made from the code that defines
them, and BENCHMARKS.md as the bench wrote it."""
