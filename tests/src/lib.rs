//! The root tests live in `tests/root/` (see README.md); this library is empty.
