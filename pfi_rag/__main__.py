from pfi_rag.cli import main

main()
