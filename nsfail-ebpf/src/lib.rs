#![no_std]

// Present so that nsfail can name this crate as a build dependency (as aya-template does).
