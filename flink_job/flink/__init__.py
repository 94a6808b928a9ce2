"""Everything that touches PyFlink or the JVM: the job's entry point, topology, SQL, state, the training shell."""
