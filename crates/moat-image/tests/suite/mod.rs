mod fake_registry;
mod import;
mod registry;
mod support;
