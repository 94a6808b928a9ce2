from tests.faulty_job import main

main()
