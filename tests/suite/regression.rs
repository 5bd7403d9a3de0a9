//! Regression tests: one test per fixed bug, named after what broke, with the minimal
//! reproduction and a line on the cause. Add them here as bugs are fixed.
