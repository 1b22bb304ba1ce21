//! Evaluation: POPE (the object-hallucination benchmark) scoring and run comparison.

pub mod compare;
pub mod pope;
