"""The command-line tools (``python -m quickcupy info|bench|ncu|llama|generate|...``): they import the library;
the library never imports them. Shared plumbing lives in :mod:`.common`."""
