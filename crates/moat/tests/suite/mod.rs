pub mod harness;
mod modes;
mod programs;
