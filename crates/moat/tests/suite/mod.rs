pub mod harness;
mod programs;
