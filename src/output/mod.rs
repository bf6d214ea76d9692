//! Renderers of a [`Report`](crate::report::Report): one module a format.
pub mod github;
pub mod html;
pub mod json;
pub mod junit;
pub mod lint_table;
pub mod markdown;
pub mod table;
