"""The media worker: fetches, decodes and preprocesses the images and videos of
a request, in a process of its own (docs/architecture.md)."""
