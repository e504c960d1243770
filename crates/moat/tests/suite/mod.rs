mod attacks_fs;
mod attacks_kernel;
mod attacks_net;
mod attacks_resources;
pub mod harness;
mod info_leaks;
mod modes;
mod programs;
mod teardown;
