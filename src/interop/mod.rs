//! Other projects' model formats: diffusers pipeline folders, read and written.

pub mod diffusers;
