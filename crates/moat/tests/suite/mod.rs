mod attacks_fs;
mod attacks_kernel;
mod attacks_net;
pub mod harness;
mod info_leaks;
mod modes;
mod programs;
