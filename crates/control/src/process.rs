//! The process driver: runs, supervises and stops the instances of a service.
