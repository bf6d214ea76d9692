//! Renderers of a [`Report`](crate::report::Report): one module a format.
pub mod json;
pub mod lint_table;
pub mod table;
