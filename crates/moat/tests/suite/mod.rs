pub mod harness;
mod modes;
mod programs;
mod attacks_kernel;
mod attacks_net;
